//! The forms a secret value takes in output when a tool re-encodes it, all searched for, and
//! the sentences that say which (the report and `--fail-on-leak` quote them: a claim about
//! redaction names exactly what was searched).

/// What is searched for each secret value, in words (the report's redaction claim and
/// `--fail-on-leak` quote it). Kept next to [`variants`]: change both together.
pub const SEARCHED_FORMS: &str = "the value as is; JSON-escaped (as serde_json, Python's \
    `json.dumps`/`jq -a` with `\\uXXXX` in either case, and with `\\/`); percent-encoded \
    (upper- or lower-case hex, space as `%20` or `+`, `/` encoded or kept); base64 (standard \
    and URL-safe, padded or not, whole or inside longer base64 at any byte alignment); base32 \
    (RFC 4648, whole or at any byte alignment); hex (lower- or upper-case, as `xxd -p` prints \
    it); each of the three encodings also wrapped over lines of 16 columns or more \
    (`base64 -w20`, GNU `base64`/`base32` at 76, `openssl base64` at 64, `xxd -p` at 60); \
    and each line of 8 bytes or more of a multi-line value";

/// What is not searched: said next to every redaction claim, so that nobody reads it as more.
pub const NOT_SEARCHED: &str = "a value split over unrelated lines or pieces of output \
    (other than the wrapped encodings above), hex dumps with offsets or spacing (`xxd`, \
    `hexdump -C`, `od`), other transformations (compressed, encrypted, base32hex, base85, \
    ROT13, …), and values shorter than 4 bytes";

/// Encodings shorter than this are not redacted on their own: they would match ordinary text.
const MIN_VARIANT: usize = 6;

/// A line of a multi-line secret shorter than this (after trimming) is not redacted on its own.
/// Each line is searched for everywhere, and the short lines of real multi-line secrets are
/// ordinary text (`{`, `-----`, `  "type": "x",`, a short name): redacting them would mangle
/// unrelated output all over the bundle. The whole value is still matched whatever its lines.
pub const MIN_SECRET_LINE: usize = 8;

/// The forms a secret takes in output besides itself: JSON-escaped (see [`json_forms`]),
/// URL-encoded (upper- and lower-case hex), base64 and base32 (whole and as they appear inside
/// a longer stream at each byte alignment), hex in either case, and each line of a multi-line
/// secret (a private key printed line by line). This is the leak class peers keep reopening
/// bugs for. Encodings wrapped over lines are found by the matcher, which joins such lines.
pub fn variants(value: &str) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    let raw = value.as_bytes();
    let mut out: Vec<Vec<u8>> = vec![raw.to_vec()];
    for json in json_forms(value) {
        out.push(json.into_bytes());
    }
    for upper in [true, false] {
        out.push(percent_encode(raw, false, upper, b""));
        out.push(percent_encode(raw, true, upper, b""));
        // Python's `urllib.parse.quote` keeps `/` by default.
        out.push(percent_encode(raw, false, upper, b"/"));
    }
    out.push(hex::encode(raw).into_bytes());
    out.push(hex::encode_upper(raw).into_bytes());
    out.push(base32(raw, true));
    for engine in [&STANDARD, &URL_SAFE] {
        out.push(engine.encode(raw).into_bytes());
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for k in 0..3usize {
            let mut data = vec![0u8; k];
            data.extend_from_slice(raw);
            let enc = engine.encode(&data).into_bytes();
            // Characters that depend on the secret's bits only.
            let start = (8 * k).div_ceil(6);
            let end = (8 * (k + raw.len())) / 6;
            if start < end && end <= enc.len() {
                out.push(enc[start..end].to_vec());
            }
        }
    }
    // Base32 puts 5 bytes in 8 characters: five alignments inside a longer stream.
    for k in 0..5usize {
        let mut data = vec![0u8; k];
        data.extend_from_slice(raw);
        let enc = base32(&data, false);
        let start = (8 * k).div_ceil(5);
        let end = (8 * (k + raw.len())) / 5;
        if start < end && end <= enc.len() {
            out.push(enc[start..end].to_vec());
        }
    }
    if value.contains('\n') {
        for line in value.lines() {
            let line = line.trim();
            if line.len() >= MIN_SECRET_LINE {
                out.push(line.as_bytes().to_vec());
            }
        }
    }
    out.retain(|v| v.len() >= MIN_VARIANT.min(raw.len()) && !v.is_empty());
    out.sort();
    out.dedup();
    out
}

/// The ways a JSON encoder writes `value` inside a string literal (without the quotes):
/// serde_json's (UTF-8 as is), the ASCII-only form with every other character as `\uXXXX`
/// (Python's `json.dumps` default, `jq -a`, .NET) in lower- and upper-case hex, and each of
/// those with `/` escaped as `\/` (PHP's `json_encode`, some Java encoders). All are valid JSON
/// for the same string, so a tool may print any of them.
fn json_forms(value: &str) -> Vec<String> {
    let plain = serde_json::to_string(value).unwrap_or_default();
    let plain = plain
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(&plain)
        .to_owned();
    let mut forms = vec![plain];
    if value.chars().any(|c| !(' '..='~').contains(&c)) {
        forms.push(json_ascii(value, false));
        forms.push(json_ascii(value, true));
    }
    if value.contains('/') {
        let slashed: Vec<String> = forms.iter().map(|f| f.replace('/', "\\/")).collect();
        forms.extend(slashed);
    }
    forms.sort();
    forms.dedup();
    forms
}

/// `value` JSON-escaped with only printable ASCII left as is, the way Python's `json.dumps`
/// writes it (`\n`, `\"`, … for the usual escapes; `\u00e4`; a surrogate pair above U+FFFF).
fn json_ascii(value: &str, upper: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(value.len() * 2);
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = if upper {
                        write!(out, "\\u{unit:04X}")
                    } else {
                        write!(out, "\\u{unit:04x}")
                    };
                }
            }
        }
    }
    out
}

/// `data` percent-encoded: `form` writes a space as `+` (HTML forms), `upper` picks the hex
/// digits' case (RFC 3986 recommends upper, many encoders write lower), `keep` are bytes left
/// as they are besides the unreserved ones.
fn percent_encode(data: &[u8], form: bool, upper: bool, keep: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 3);
    for &b in data {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || keep.contains(&b)
        {
            out.push(b);
        } else if form && b == b' ' {
            out.push(b'+');
        } else if upper {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.extend_from_slice(format!("%{b:02x}").as_bytes());
        }
    }
    out
}

/// RFC 4648 base32 (what coreutils `base32` and Python's `b32encode` print), with `=` padding
/// when `pad`.
fn base32(data: &[u8], pad: bool) -> Vec<u8> {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = Vec::with_capacity(data.len().div_ceil(5) * 8);
    for chunk in data.chunks(5) {
        let mut block = [0u8; 5];
        block[..chunk.len()].copy_from_slice(chunk);
        let bits = block.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                out.push(ALPHABET[((bits >> (35 - 5 * i)) & 31) as usize]);
            } else if pad {
                out.push(b'=');
            }
        }
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_is_rfc_4648() {
        // RFC 4648 section 10.
        for (plain, enc) in [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ] {
            assert_eq!(base32(plain.as_bytes(), true), enc.as_bytes(), "{plain}");
        }
        assert_eq!(base32(b"foobar", false), b"MZXW6YTBOI");
    }

    #[test]
    fn every_new_form_is_a_variant() {
        let secret = "Pass/word 9!";
        let v = variants(secret);
        let has = |f: &str| v.iter().any(|x| x == f.as_bytes());
        for form in [
            "506173732f776f7264203921",
            "506173732F776F7264203921",
            "Pass%2fword%209%21",
            "Pass%2fword+9%21",
            "Pass/word%209%21",
            "Pass/word%209%21",
            "KBQXG4ZPO5XXEZBAHEQQ====",
        ] {
            assert!(has(form), "{form} in {v:?}");
        }
    }
}
