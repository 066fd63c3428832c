//! What the values of `http`, `tcp`, `screenshot` and `upload` tables must be, so that
//! `runbook check` rejects a literal mistake (`timeout = "3 sec0nds"`, `port = 70000`) before
//! anything runs, at its line and column. A templated value can only be judged once rendered;
//! the step checks it then, with the same rules.

use serde_json::Value;

use crate::runbook::RequestKind;

/// Checks one key's value; `Err` says what was expected. Each kind's rules are in its
/// descriptor ([`crate::step_kind`]); the value rules they share are below.
pub fn check_value(kind: RequestKind, key: &str, v: &Value) -> Result<(), String> {
    (kind.spec().check)(key, v)
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

pub(crate) fn non_empty(key: &str, v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(()),
        _ => Err(format!("`{key}` must be a non-empty string")),
    }
}

pub(crate) fn url(v: &Value, schemes: &[&str]) -> Result<(), String> {
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

pub(crate) fn boolean(key: &str, v: &Value) -> Result<(), String> {
    match v {
        Value::Bool(_) => Ok(()),
        _ => Err(format!("`{key}` must be `true` or `false`")),
    }
}

pub(crate) fn table_of_strings(key: &str, v: &Value) -> Result<(), String> {
    match v {
        Value::Object(m) if m.values().all(Value::is_string) => Ok(()),
        _ => Err(format!("`{key}` must be a table of strings")),
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
