//! Secret redaction for text the engine produces itself (commands, messages). Streamed output is
//! redacted by the evidence writer with the same secret list.

/// Known secret values and the names they are reported under.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// (name, value), longest value first.
    secrets: Vec<(String, String)>,
}

impl Redactor {
    pub fn new(mut secrets: Vec<(String, String)>) -> Self {
        // Too short to redact without mangling ordinary text (see the evidence redactor).
        secrets.retain(|(_, v)| v.len() >= 4);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.1.len()));
        Self { secrets }
    }

    pub fn secrets(&self) -> &[(String, String)] {
        &self.secrets
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    pub fn redact_str(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (name, value) in &self.secrets {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), &format!("[REDACTED:{name}]"));
            }
        }
        out
    }
}

/// Whether the line after `previous` may be the end of base64 text wrapped over lines:
/// `previous` ends in at least 64 base64 characters (GNU `base64` wraps at 76 columns,
/// `openssl base64` at 64). The evidence redactor finds a secret's base64 form across such
/// lines; a line on its own holds only a piece of it, which no redactor can recognise.
pub fn continues_wrapped_base64(previous: &str) -> bool {
    previous
        .trim_end_matches('\r')
        .bytes()
        .rev()
        .take_while(|b| b.is_ascii_alphanumeric() || b"+/-_".contains(b))
        .count()
        >= 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_base64_is_recognised_by_the_line_before() {
        let full = "bG9uZy1zZWNyZXQvd2l0aCtzcGVjaWFsIGNoYXJzJj0/fiBhbmQgbW9yZSB0ZXh0IHRvIGV4Y2Vl";
        assert!(continues_wrapped_base64(full));
        assert!(continues_wrapped_base64(&format!("{}\r", &full[..64])));
        assert!(!continues_wrapped_base64(&full[..63]));
        assert!(!continues_wrapped_base64(
            "FAIL os: expected Rocky Linux 9.x; found Debian 12"
        ));
    }
}
