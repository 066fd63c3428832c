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
        self.redact_prefix(data, data.len()).0
    }

    /// Redacts matches that start before `cut`; returns the output and how many input bytes it
    /// covers (a match straddling `cut` is taken whole). Callers streaming a file keep the rest
    /// for the next chunk; with `cut = len - overlap()` no match is ever split.
    pub fn redact_prefix(&self, data: &[u8], cut: usize) -> (Vec<u8>, usize) {
        if self.secrets.is_empty() {
            return (data[..cut].to_vec(), cut);
        }
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        'outer: while i < cut {
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
        (out, i)
    }

    /// Rewrites a file with every known secret redacted, streaming in chunks. Used when a
    /// secret is registered after output that contains it was already written.
    pub fn redact_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::{Read, Write};
        if self.secrets.is_empty() {
            return Ok(());
        }
        let tmp = path.with_extension("redacting");
        let mut input = std::fs::File::open(path)?;
        let mut output = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 1024 * 1024];
        loop {
            let n = input.read(&mut chunk)?;
            buf.extend_from_slice(&chunk[..n]);
            let cut = if n == 0 {
                buf.len()
            } else {
                buf.len().saturating_sub(self.overlap())
            };
            let (out, used) = self.redact_prefix(&buf, cut);
            output.write_all(&out)?;
            buf.drain(..used);
            if n == 0 {
                break;
            }
        }
        output.flush()?;
        output.get_ref().sync_all()?;
        drop(output);
        std::fs::rename(&tmp, path)
    }

    /// Redacts every string (and key) in a JSON value, before it is serialised.
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        if self.secrets.is_empty() {
            return;
        }
        match value {
            Value::String(s) => {
                let r = self.redact_str(s);
                if r != *s {
                    *s = r;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            Value::Object(map) => {
                let old = std::mem::take(map);
                for (k, mut v) in old {
                    self.redact_json(&mut v);
                    map.insert(self.redact_str(&k), v);
                }
            }
            _ => {}
        }
    }

    pub fn redact_str(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacting_a_file_in_chunks_equals_redacting_it_whole() {
        let r = ByteRedactor::new(&[("t".into(), "s3cr3t-token".into())]);
        let mut data = Vec::new();
        for i in 0..300_000 {
            data.extend_from_slice(format!("line {i} s3cr3t-token\n").as_bytes());
        }
        let dir = std::env::temp_dir().join(format!("rb-redact-{}", std::process::id()));
        std::fs::write(&dir, &data).expect("write");
        r.redact_file(&dir).expect("redact");
        let got = std::fs::read(&dir).expect("read");
        let _ = std::fs::remove_file(&dir);
        assert_eq!(got, r.redact(&data));
        assert!(!String::from_utf8_lossy(&got).contains("s3cr3t"));
    }

    /// Regression: a secret with a quote in it was stored as written in manifest.json, because
    /// redaction ran on the JSON text where the quote is escaped.
    #[test]
    fn secrets_with_json_special_characters_are_redacted_in_json() {
        let r = ByteRedactor::new(&[("pw".into(), "pa\"ss\\word".into())]);
        let mut v = serde_json::json!({"command_line": ["runbook", "--set", "pw=pa\"ss\\word"]});
        r.redact_json(&mut v);
        assert!(!v.to_string().contains("pa\\\"ss"), "{v}");
        assert_eq!(v["command_line"][2], "pw=[REDACTED:pw]");
    }

    #[test]
    fn replaces_longest_first() {
        let r = ByteRedactor::new(&[("a".into(), "tok".into()), ("b".into(), "token123".into())]);
        assert_eq!(
            r.redact_str("x token123 tok"),
            "x [REDACTED:b] [REDACTED:a]"
        );
    }
}
