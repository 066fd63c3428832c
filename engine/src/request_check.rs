//! What the values of `http`, `tcp`, `screenshot` and `upload` tables must be, so that
//! `runbook check` rejects a literal mistake (`timeout = "3 sec0nds"`, `port = 70000`) before
//! anything runs, at its line and column. A templated value can only be judged once rendered;
//! the step checks it then, with the same rules.

use serde_json::Value;

use crate::runbook::RequestKind;

/// Checks one key's value; `Err` says what was expected.
pub fn check_value(kind: RequestKind, key: &str, v: &Value) -> Result<(), String> {
    match (kind, key) {
        (_, "timeout") => timeout(v).map(drop),
        (RequestKind::Tcp, "port") => port(v).map(drop),
        (RequestKind::Tcp, "host") | (RequestKind::Upload, "dest") => non_empty(key, v),
        (RequestKind::Http, "url") => url(v, &["http", "https"]),
        (RequestKind::Screenshot, "url") => url(v, &["http", "https", "file", "data", "about"]),
        (RequestKind::Http, "method") => method(v),
        (RequestKind::Http, "expect_status") => expect_status(v),
        (_, "follow_redirects" | "insecure_skip_verify" | "full_page") => match v {
            Value::Bool(_) => Ok(()),
            _ => Err(format!("`{key}` must be `true` or `false`")),
        },
        (_, "max_body") => match v.as_u64() {
            Some(_) => Ok(()),
            None => Err("`max_body` must be a number of bytes (0 or more)".into()),
        },
        (RequestKind::Screenshot, "width" | "height") => match v.as_u64() {
            Some(1..=16_384) => Ok(()),
            _ => Err(format!(
                "`{key}` must be a number of pixels from 1 to 16384"
            )),
        },
        (RequestKind::Upload, "mode") => mode(v).map(drop),
        (_, "headers" | "query" | "form") => match v {
            Value::Object(m) if m.values().all(Value::is_string) => Ok(()),
            _ => Err(format!("`{key}` must be a table of strings")),
        },
        _ => Ok(()),
    }
}

/// A probe's `timeout`: a duration above zero.
pub fn timeout(v: &Value) -> Result<std::time::Duration, String> {
    let Value::String(text) = v else {
        return Err("`timeout` must be a duration like \"10s\"".into());
    };
    match crate::duration::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("`timeout` must be more than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("`timeout`: {e}")),
    }
}

pub fn port(v: &Value) -> Result<u16, String> {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`port` must be a number from 1 to 65535, not {v}"))
}

/// An upload's `mode`: octal, as a string (`"0644"`) or a number written in octal digits.
pub fn mode(v: &Value) -> Result<u32, String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(format!(
                "`mode = {other}` is not an octal mode like \"0644\""
            ))
        }
    };
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("`mode = \"{text}\"` is not an octal mode like \"0644\""))
}

fn non_empty(key: &str, v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(()),
        _ => Err(format!("`{key}` must be a non-empty string")),
    }
}

fn url(v: &Value, schemes: &[&str]) -> Result<(), String> {
    let Value::String(text) = v else {
        return Err("`url` must be a string".into());
    };
    let parsed = url::Url::parse(text).map_err(|e| format!("`url` `{text}` is not a URL: {e}"))?;
    if schemes.contains(&parsed.scheme()) {
        Ok(())
    } else {
        Err(format!(
            "`url` scheme `{}` is not supported ({})",
            parsed.scheme(),
            schemes.join(", ")
        ))
    }
}

/// Any HTTP token is a method (extension methods included), so only the characters are checked.
fn method(v: &Value) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    match v {
        Value::String(m) if !m.is_empty() && m.chars().all(token) => Ok(()),
        _ => Err(format!("`method` {v} is not an HTTP method like \"GET\"")),
    }
}

/// `200`, `"2xx"`, `"200-299"`, or a non-empty list of those.
fn expect_status(v: &Value) -> Result<(), String> {
    let one = |v: &Value| -> bool {
        match v {
            Value::Number(n) => n.as_u64().is_some_and(|c| (100..=599).contains(&c)),
            Value::String(p) => {
                let p = p.trim();
                let code = |s: &str| s.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                code(p)
                    || (p.len() == 3
                        && p.as_bytes()[0].is_ascii_digit()
                        && (b'1'..=b'5').contains(&p.as_bytes()[0])
                        && p[1..].eq_ignore_ascii_case("xx"))
                    || p.split_once('-').is_some_and(|(a, b)| {
                        code(a.trim()) && code(b.trim()) && a.trim() <= b.trim()
                    })
            }
            _ => false,
        }
    };
    let ok = match v {
        Value::Array(items) => !items.is_empty() && items.iter().all(one),
        other => one(other),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`expect_status` {v} is not a status: write 200, \"2xx\", \"200-299\" or a list of them"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literal_mistakes_are_named() {
        let bad = [
            (RequestKind::Tcp, "timeout", json!("3 sec0nds")),
            (RequestKind::Tcp, "timeout", json!("0s")),
            (RequestKind::Tcp, "port", json!(70000)),
            (RequestKind::Tcp, "port", json!(0)),
            (RequestKind::Tcp, "port", json!("22")),
            (RequestKind::Http, "url", json!("not a url")),
            (RequestKind::Http, "url", json!("ftp://x/")),
            (RequestKind::Http, "method", json!("GE T")),
            (RequestKind::Http, "expect_status", json!("2xy")),
            (RequestKind::Http, "expect_status", json!([])),
            (RequestKind::Upload, "mode", json!("999")),
            (RequestKind::Upload, "dest", json!("")),
            (RequestKind::Screenshot, "width", json!(0)),
        ];
        for (kind, key, v) in bad {
            assert!(check_value(kind, key, &v).is_err(), "{key} = {v}");
        }
        let good = [
            (RequestKind::Tcp, "timeout", json!("1500ms")),
            (RequestKind::Tcp, "port", json!(6443)),
            (
                RequestKind::Http,
                "url",
                json!("https://127.0.0.1:8443/healthz"),
            ),
            (RequestKind::Http, "method", json!("PATCH")),
            (
                RequestKind::Http,
                "expect_status",
                json!([200, "3xx", "401-403"]),
            ),
            (RequestKind::Upload, "mode", json!("0600")),
            (RequestKind::Upload, "mode", json!(644)),
            (RequestKind::Screenshot, "url", json!("about:blank")),
        ];
        for (kind, key, v) in good {
            assert_eq!(check_value(kind, key, &v), Ok(()), "{key} = {v}");
        }
    }
}
