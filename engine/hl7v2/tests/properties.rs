//! Invariants of the parser over generated input.

use proptest::prelude::*;
use tributary_hl7v2::{escape, split_batch, unescape, Delimiters, Message};

fn delimiters() -> impl Strategy<Value = Delimiters> {
    // Distinct ASCII punctuation for the five encoding characters (four plus field).
    proptest::sample::subsequence(b"|^~\\&#!@$%*+".to_vec(), 5)
        .prop_shuffle()
        .prop_map(|c| Delimiters {
            field: char::from(c[0]),
            component: char::from(c[1]),
            repetition: char::from(c[2]),
            escape: char::from(c[3]),
            subcomponent: char::from(c[4]),
            truncation: None,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Hostile bytes never panic the parser; they parse or fail with a position.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::parse(&bytes);
        let _ = split_batch(&bytes);
        let mut with_header = b"MSH|^~\\&|".to_vec();
        with_header.extend_from_slice(&bytes);
        if let Ok(m) = Message::parse(&with_header) {
            for s in m.segments() {
                for (_, f) in s.fields() {
                    for r in f.repetitions() {
                        for c in r.parts() {
                            let _ = c.value();
                        }
                    }
                }
            }
        }
    }

    /// Any text written into a field with `escape` reads back unchanged, whatever the delimiters.
    #[test]
    fn escape_then_parse_round_trips(d in delimiters(), text in "[ -~\u{e0}-\u{ff}]{0,40}") {
        let enc: String = [d.component, d.repetition, d.escape, d.subcomponent].iter().collect();
        let msg = format!("MSH{}{enc}{}A\rPID{}1{}{}", d.field, d.field, d.field, d.field, escape(&text, &d));
        let m = Message::parse(msg.as_bytes()).unwrap();
        let f = m.segment("PID").unwrap().field(2).unwrap();
        prop_assert_eq!(f.value(), text.as_str());
        prop_assert_eq!(f.repetitions().count(), 1);
        let escaped = escape(&text, &d);
        prop_assert_eq!(unescape(&escaped, &d), text.as_str());
    }
}
