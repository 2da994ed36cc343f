use std::borrow::Cow;

/// The character set a message declares in MSH-18 (first repetition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Charset {
    /// MSH-18 empty: the standard's default is ASCII; we accept UTF-8 and fall back to
    /// ISO 8859-1 for bytes that are not valid UTF-8 rather than rejecting the message.
    Undeclared,
    Ascii,
    /// `8859/1`: decoded byte-for-byte (U+0000–U+00FF), not as Windows-1252.
    Latin1,
    Utf8,
    /// Another charset `encoding_rs` knows (`8859/2` … `8859/15`, `ISO IR87`, `UNICODE UTF-16`).
    Other(&'static encoding_rs::Encoding),
}

impl Charset {
    /// The decoder for a whole MSH-18: its first repetition is the default character set, and
    /// later ones name the sets the message switches to with ISO 2022 escape sequences. The
    /// Japanese sets (`ISO IR87`, `ISO IR159`) over an ASCII default are decoded as ISO-2022-JP,
    /// which reads those escapes; decoded as ASCII, the escapes and the kanji bytes would pass
    /// as Latin letters and punctuation and reach the output garbled without an error.
    pub fn from_msh18_repetitions(values: &[String]) -> Option<Self> {
        let first = Self::from_msh18(values.first().map_or("", String::as_str))?;
        let switches_to_japanese = values.iter().skip(1).any(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "ISO IR87" | "ISO IR159"
            )
        });
        if switches_to_japanese && matches!(first, Charset::Ascii | Charset::Undeclared) {
            return Self::from_msh18("ISO IR87");
        }
        Some(first)
    }

    /// Maps an MSH-18 value (HL7 table 0211) to a decoder; `None` when unsupported.
    pub fn from_msh18(value: &str) -> Option<Self> {
        let v = value.trim();
        let enc =
            |label: &str| encoding_rs::Encoding::for_label(label.as_bytes()).map(Charset::Other);
        match v.to_ascii_uppercase().as_str() {
            "" => Some(Charset::Undeclared),
            "ASCII" => Some(Charset::Ascii),
            "8859/1" => Some(Charset::Latin1),
            "UNICODE UTF-8" | "UTF-8" | "UNICODE" => Some(Charset::Utf8),
            "UNICODE UTF-16" => Some(Charset::Other(encoding_rs::UTF_16LE)),
            "ISO IR87" | "ISO IR159" => enc("iso-2022-jp"),
            "ISO IR6" => Some(Charset::Ascii),
            "ISO IR100" => Some(Charset::Latin1),
            "GB 18030-2000" => enc("gb18030"),
            "KS X 1001" => enc("euc-kr"),
            "BIG-5" => enc("big5"),
            other => {
                let n = other.strip_prefix("8859/")?;
                let n: u8 = n.parse().ok()?;
                if n == 1 {
                    return Some(Charset::Latin1);
                }
                enc(&format!("iso-8859-{n}"))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Charset::Undeclared => "undeclared",
            Charset::Ascii => "ASCII",
            Charset::Latin1 => "8859/1",
            Charset::Utf8 => "UNICODE UTF-8",
            Charset::Other(e) => e.name(),
        }
    }

    /// Decodes the whole message. `Err(offset)` gives the first byte that is invalid in the
    /// declared charset (ASCII with a high byte, UTF-8 with a bad sequence).
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Cow<'a, str>, usize> {
        match self {
            Charset::Ascii => match bytes.iter().position(|b| !b.is_ascii()) {
                None => Ok(Cow::Borrowed(
                    std::str::from_utf8(bytes).map_err(|e| e.valid_up_to())?,
                )),
                Some(i) => Err(i),
            },
            Charset::Utf8 => std::str::from_utf8(bytes)
                .map(Cow::Borrowed)
                .map_err(|e| e.valid_up_to()),
            // UTF-8 where it is valid, ISO 8859-1 for the bytes that are not: one stray byte
            // (a Windows quote in a note) must not turn every UTF-8 name into mojibake.
            Charset::Undeclared => match std::str::from_utf8(bytes) {
                Ok(s) => Ok(Cow::Borrowed(s)),
                Err(_) => {
                    let mut out = String::with_capacity(bytes.len() + 8);
                    for chunk in bytes.utf8_chunks() {
                        out.push_str(chunk.valid());
                        out.extend(chunk.invalid().iter().map(|&b| char::from(b)));
                    }
                    Ok(Cow::Owned(out))
                }
            },
            Charset::Latin1 => match std::str::from_utf8(bytes) {
                Ok(s) if bytes.is_ascii() => Ok(Cow::Borrowed(s)),
                _ => Ok(Cow::Owned(latin1(bytes))),
            },
            Charset::Other(enc) => {
                let (text, had_errors) = enc.decode_without_bom_handling(bytes);
                if had_errors {
                    Err(0)
                } else {
                    Ok(text)
                }
            }
        }
    }
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|b| char::from(*b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_0211_values() {
        assert_eq!(Charset::from_msh18("8859/1"), Some(Charset::Latin1));
        assert_eq!(Charset::from_msh18("UNICODE UTF-8"), Some(Charset::Utf8));
        assert_eq!(Charset::from_msh18(""), Some(Charset::Undeclared));
        assert!(matches!(
            Charset::from_msh18("8859/15"),
            Some(Charset::Other(_))
        ));
        assert_eq!(Charset::from_msh18("EBCDIC"), None);
    }

    #[test]
    fn latin1_is_not_windows_1252() {
        assert_eq!(
            Charset::Latin1.decode(&[0x4d, 0xfc, 0x80]).unwrap(),
            "M\u{fc}\u{80}"
        );
        assert_eq!(Charset::Ascii.decode(&[0x41, 0xfc]).unwrap_err(), 1);
        assert_eq!(Charset::Utf8.decode(&[0x41, 0xfc]).unwrap_err(), 1);
        assert_eq!(
            Charset::Undeclared.decode(&[0x41, 0xfc]).unwrap(),
            "A\u{fc}"
        );
        // valid UTF-8 stays UTF-8 beside a stray byte
        assert_eq!(
            Charset::Undeclared
                .decode(
                    "MU\u{d1}OZ|"
                        .as_bytes()
                        .iter()
                        .chain(&[0x93])
                        .copied()
                        .collect::<Vec<_>>()
                        .as_slice()
                )
                .unwrap(),
            "MU\u{d1}OZ|\u{93}"
        );
    }
}
