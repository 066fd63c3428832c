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
