//! Byte-level secret redaction for streamed output. A secret split across two reads is still
//! found because callers keep the last `overlap()` bytes of a chunk back until more arrives.

/// Replaces every secret value with `[REDACTED:<name>]`.
#[derive(Debug, Clone, Default)]
pub struct ByteRedactor {
    /// (name, value), longest value first so a secret containing another is replaced whole.
    secrets: Vec<(String, Vec<u8>)>,
    longest: usize,
}

impl ByteRedactor {
    pub fn new(secrets: &[(String, String)]) -> Self {
        let mut secrets: Vec<(String, Vec<u8>)> = secrets
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, v)| (n.clone(), v.as_bytes().to_vec()))
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.1.len()));
        let longest = secrets.first().map_or(0, |s| s.1.len());
        Self { secrets, longest }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Bytes a streaming caller must hold back so that a secret cut by a chunk boundary is
    /// still seen whole.
    pub fn overlap(&self) -> usize {
        self.longest.saturating_sub(1)
    }

    pub fn redact(&self, data: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return data.to_vec();
        }
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        'outer: while i < data.len() {
            for (name, value) in &self.secrets {
                if data[i..].starts_with(value) {
                    out.extend_from_slice(format!("[REDACTED:{name}]").as_bytes());
                    i += value.len();
                    continue 'outer;
                }
            }
            out.push(data[i]);
            i += 1;
        }
        out
    }

    pub fn redact_str(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_longest_first() {
        let r = ByteRedactor::new(&[("a".into(), "tok".into()), ("b".into(), "token123".into())]);
        assert_eq!(
            r.redact_str("x token123 tok"),
            "x [REDACTED:b] [REDACTED:a]"
        );
    }
}
