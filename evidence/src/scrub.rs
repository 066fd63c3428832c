//! Credentials that come with URLs from the environment (a CI checkout's git remote carries
//! its job token as `https://gitlab-ci-token:…@host/…`; presigned and API URLs carry
//! `?private_token=…`, `X-Amz-Signature=…`). Values the runbook does not know as secrets, so
//! redaction by value cannot catch them: each URL in a string loses its userinfo and the
//! values of credential-looking query parameters, replaced by a `[REDACTED:…]` placeholder.

use std::sync::LazyLock;

use serde_json::Value;

/// Placeholder for a URL's `user:password@` (or a bare token used as user name).
pub const USERINFO_PLACEHOLDER: &str = "[REDACTED:url-userinfo]";
/// Placeholder for the value of a credential query parameter.
pub const QUERY_PLACEHOLDER: &str = "[REDACTED:url-query]";

/// Query parameter names (lower case) whose values are credentials.
const CREDENTIAL_PARAMS: &[&str] = &[
    "private_token",
    "access_token",
    "refresh_token",
    "id_token",
    "job_token",
    "token",
    "auth",
    "auth_token",
    "api_key",
    "apikey",
    "api-key",
    "key",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "pwd",
    "pass",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "sessionid",
    "session_token",
    "jwt",
];

/// Schemes whose user name is a login, not a credential (`ssh://git@host/…`): kept unless a
/// password follows it.
const LOGIN_SCHEMES: &[&str] = &["ssh", "git+ssh", "ssh+git", "sftp"];

static URL: LazyLock<Option<regex::Regex>> =
    LazyLock::new(|| regex::Regex::new(r#"(?i)\b([a-z][a-z0-9+.-]*)://[^\s"'<>`]+"#).ok());

/// One URL's credentials removed; `found` gets a name per removal (`userinfo`, `query:<name>`).
fn scrub_url(url: &str, scheme: &str, found: &mut Vec<String>) -> String {
    let after_scheme = scheme.len() + 3;
    let rest = &url[after_scheme..];
    // The authority ends at the first `/`, `?` or `#`; userinfo is what precedes its last `@`.
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..after_scheme]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let login = LOGIN_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str())
                && !userinfo.contains(':');
            if login || userinfo.starts_with("[REDACTED:") {
                out.push_str(authority);
            } else {
                out.push_str(USERINFO_PLACEHOLDER);
                out.push_str(&authority[at..]);
                found.push("userinfo".into());
            }
        }
        None => out.push_str(authority),
    }
    let tail = &rest[auth_end..];
    let Some(q) = tail.find('?') else {
        out.push_str(tail);
        return out;
    };
    out.push_str(&tail[..=q]);
    let query_and_fragment = &tail[q + 1..];
    let (query, fragment) = match query_and_fragment.find('#') {
        Some(h) => query_and_fragment.split_at(h),
        None => (query_and_fragment, ""),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value))
                if !value.is_empty()
                    && !value.starts_with("[REDACTED:")
                    && CREDENTIAL_PARAMS.contains(&name.to_ascii_lowercase().as_str()) =>
            {
                found.push(format!("query:{name}"));
                format!("{name}={QUERY_PLACEHOLDER}")
            }
            _ => pair.to_owned(),
        })
        .collect();
    out.push_str(&pairs.join("&"));
    out.push_str(fragment);
    out
}

/// `text` with every URL's credentials removed; `found` gets what was removed.
pub fn scrub_str(text: &str, found: &mut Vec<String>) -> String {
    let Some(re) = URL.as_ref() else {
        return text.to_owned();
    };
    if !text.contains("://") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for caps in re.captures_iter(text) {
        let (Some(m), Some(scheme)) = (caps.get(0), caps.get(1)) else {
            continue;
        };
        out.push_str(&text[last..m.start()]);
        out.push_str(&scrub_url(m.as_str(), scheme.as_str(), found));
        last = m.end();
    }
    out.push_str(&text[last..]);
    out
}

/// Scrubs every string (and key) of a JSON value; returns one `<path>: <what>` entry per
/// removal, for the manifest to say what was removed where.
pub fn scrub_json(value: &mut Value, path: &str) -> Vec<String> {
    let mut removed = Vec::new();
    walk(value, path, &mut removed);
    removed
}

fn walk(value: &mut Value, path: &str, removed: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            let mut found = Vec::new();
            let clean = scrub_str(s, &mut found);
            if !found.is_empty() {
                *s = clean;
                removed.extend(found.into_iter().map(|f| format!("{path}: {f}")));
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                walk(v, &format!("{path}[{i}]"), removed);
            }
        }
        Value::Object(map) => {
            let old = std::mem::take(map);
            for (k, mut v) in old {
                let mut found = Vec::new();
                let key = scrub_str(&k, &mut found);
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                removed.extend(found.into_iter().map(|f| format!("{child} (key): {f}")));
                walk(&mut v, &child, removed);
                map.insert(key, v);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(s: &str) -> (String, Vec<String>) {
        let mut found = Vec::new();
        (scrub_str(s, &mut found), found)
    }

    #[test]
    fn ci_remotes_lose_their_tokens() {
        for (remote, clean) in [
            (
                "https://gitlab-ci-token:glcbt-64_aBcDeFgHiJkLmNoP@gitlab.example.com/ops/rb.git",
                "https://[REDACTED:url-userinfo]@gitlab.example.com/ops/rb.git",
            ),
            (
                "https://x-access-token:ghs_16C7e42F292c6912E7710c838347Ae178B4a@github.com/o/r",
                "https://[REDACTED:url-userinfo]@github.com/o/r",
            ),
            (
                "https://oauth2:ya29.a0AfH6SMBx@git.example.com/ops.git",
                "https://[REDACTED:url-userinfo]@git.example.com/ops.git",
            ),
            (
                "https://ghp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@github.com/o/r.git",
                "https://[REDACTED:url-userinfo]@github.com/o/r.git",
            ),
            (
                "https://gitlab.example.com/api/v4/projects/1?private_token=glpat-XyZ123&per_page=5#top",
                "https://gitlab.example.com/api/v4/projects/1?private_token=[REDACTED:url-query]&per_page=5#top",
            ),
            (
                "https://s3.example.com/b/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12",
                "https://s3.example.com/b/k?X-Amz-Credential=[REDACTED:url-query]&X-Amz-Signature=[REDACTED:url-query]",
            ),
        ] {
            let (out, found) = scrub(remote);
            assert_eq!(out, clean);
            assert!(!found.is_empty());
        }
    }

    #[test]
    fn plain_urls_and_ssh_logins_are_kept() {
        for s in [
            "https://git.example.com/ops.git",
            "git@github.com:o/r.git",
            "ssh://git@github.com/o/r.git",
            "https://example.com/search?q=token&page=2",
            "no url here: user:pass@host",
        ] {
            let (out, found) = scrub(s);
            assert_eq!(out, s);
            assert!(found.is_empty(), "{s}: {found:?}");
        }
        let (out, _) = scrub("ssh://deploy:hunter2@host/r");
        assert_eq!(out, "ssh://[REDACTED:url-userinfo]@host/r");
    }

    #[test]
    fn json_scrub_names_each_place() {
        let mut v = serde_json::json!({
            "git": {"remote": "https://u:tok3n-abcdef@git.example.com/ops.git"},
            "args": ["runbook", "run", "--set", "src=https://h/x?token=abc"],
        });
        let mut removed = scrub_json(&mut v, "");
        removed.sort();
        assert_eq!(
            removed,
            vec!["args[3]: query:token", "git.remote: userinfo"]
        );
        assert!(!v.to_string().contains("tok3n"));
        assert!(!v.to_string().contains("=abc"));
    }
}
