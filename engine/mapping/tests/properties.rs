//! Invariants over generated input: HL7 date/time values become valid FHIR R4 values or a
//! reported error, never an invalid value; and no field value a sender can put in a message makes
//! the mapping library panic or write an invalid date.
//!
//! The R4 rules checked here (datatypes page): a `date` is `YYYY[-MM[-DD]]` and a valid calendar
//! date; a `dateTime` with a time has seconds and an offset between -14:00 and +14:00; an
//! `instant` is a full date and time with an offset; a `time` is `hh:mm:ss[.f…]`.

#[path = "support/positions.rs"]
mod positions;

use proptest::prelude::*;
use regex::Regex;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;
use tributary_mapping::datetime::{to_date, to_datetime, to_instant, to_time};
use tributary_mapping::{MappingSet, RunOptions};

struct R4 {
    date: Regex,
    date_time: Regex,
    instant: Regex,
    time: Regex,
}

fn r4() -> &'static R4 {
    static R: OnceLock<R4> = OnceLock::new();
    R.get_or_init(|| {
        let date = r"[0-9]{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01]))?)?";
        let full = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])";
        let clock = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?";
        let zone = r"(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))";
        let re = |s: String| Regex::new(&format!("^{s}$")).unwrap();
        R4 {
            date: re(date.to_string()),
            date_time: re(format!("({full}T{clock}{zone}|{date})")),
            instant: re(format!("{full}T{clock}{zone}")),
            time: re(clock.to_string()),
        }
    })
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        2 if y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Whether `v` matches `re`, its year is not 0000 and its day (where present) exists.
fn valid(re: &Regex, v: &str) -> bool {
    if !re.is_match(v) || v.starts_with("0000") {
        return false;
    }
    let n = |r: std::ops::Range<usize>| v.get(r).and_then(|x| x.parse::<u32>().ok());
    match (n(0..4), n(5..7), n(8..10)) {
        (Some(y), Some(m), Some(d)) if v.as_bytes().get(7) == Some(&b'-') => {
            d <= days_in_month(y, m)
        }
        _ => true,
    }
}

/// Strings shaped like HL7 DTM/TM values (digits, a fraction, an offset), most of them
/// out of range somewhere.
fn dtm_like() -> impl Strategy<Value = String> {
    "[0-9]{0,15}(\\.[0-9]{0,5})?([+-][0-9]{0,5})?"
}

/// DTMs built from components at and just past their limits (day 31 of every month, hour 24,
/// offset +14:30), cut to each precision HL7 allows.
fn dtm_edges() -> impl Strategy<Value = String> {
    (
        (0u32..=9999, 0u32..=13, 28u32..=32),
        (0u32..=24, 0u32..=60, 0u32..=61),
        proptest::sample::select(vec![4usize, 6, 8, 10, 12, 14]),
        proptest::option::of("[0-9]{1,4}"),
        proptest::option::of((0u32..=15, prop_oneof![Just(0u32), Just(30), 0u32..=60])),
    )
        .prop_map(|((y, m, d), (h, mi, s), len, frac, off)| {
            let mut v = format!("{y:04}{m:02}{d:02}{h:02}{mi:02}{s:02}")[..len].to_string();
            if let (Some(f), 14) = (frac, len) {
                v.push('.');
                v.push_str(&f);
            }
            if let Some((oh, om)) = off {
                v.push_str(&format!("+{oh:02}{om:02}"));
            }
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Whatever the text, each conversion gives a valid R4 value or an error.
    #[test]
    fn conversions_give_valid_r4_values_or_an_error(
        raw in prop_oneof![dtm_edges(), dtm_like(), any::<String>(), "[0-9 +.\\-TZ:]{0,20}"]
    ) {
        let r = r4();
        if let Ok(v) = to_date(&raw) {
            prop_assert!(valid(&r.date, &v), "date {v:?} from {raw:?}");
        }
        for tz in ["Z", "+01:00", "-14:00"] {
            if let Ok(v) = to_datetime(&raw, tz) {
                prop_assert!(valid(&r.date_time, &v), "dateTime {v:?} from {raw:?}");
            }
            if let Ok(v) = to_instant(&raw, tz) {
                prop_assert!(valid(&r.instant, &v), "instant {v:?} from {raw:?}");
            }
        }
        if let Ok(v) = to_time(&raw) {
            prop_assert!(r.time.is_match(&v), "time {v:?} from {raw:?}");
        }
    }

    /// A valid DTM keeps its precision, fraction and offset, at every precision HL7 allows.
    #[test]
    fn valid_values_convert_exactly(
        (y, m, d) in (1u32..=9999, 1u32..=12)
            .prop_flat_map(|(y, m)| (Just(y), Just(m), 1..=days_in_month(y, m))),
        (h, mi, s) in (0u32..=23, 0u32..=59, 0u32..=59),
        frac in proptest::option::of("[0-9]{1,4}"),
        offset in proptest::option::of((prop_oneof![Just('+'), Just('-')], 0u32..=13, 0u32..=59)),
    ) {
        let frac_in = frac.as_ref().map(|f| format!(".{f}")).unwrap_or_default();
        let (off_in, off_out) = match offset {
            Some((sign, oh, om)) => (format!("{sign}{oh:02}{om:02}"), format!("{sign}{oh:02}:{om:02}")),
            None => (String::new(), "Z".to_string()),
        };
        let raw = format!("{y:04}{m:02}{d:02}{h:02}{mi:02}{s:02}{frac_in}{off_in}");
        let day = format!("{y:04}-{m:02}-{d:02}");
        prop_assert_eq!(
            to_datetime(&raw, "Z").unwrap(),
            format!("{day}T{h:02}:{mi:02}:{s:02}{frac_in}{off_out}")
        );
        prop_assert_eq!(to_date(&raw).unwrap(), day.clone());
        let digits = format!("{y:04}{m:02}{d:02}{h:02}{mi:02}");
        prop_assert_eq!(to_datetime(&digits[..4], "Z").unwrap(), format!("{y:04}"));
        prop_assert_eq!(to_datetime(&digits[..6], "Z").unwrap(), format!("{y:04}-{m:02}"));
        prop_assert_eq!(to_datetime(&digits[..8], "Z").unwrap(), day.clone());
        prop_assert_eq!(
            to_datetime(&format!("{}{off_in}", &digits[..10]), "Z").unwrap(),
            format!("{day}T{h:02}:00:00{off_out}")
        );
        prop_assert_eq!(
            to_instant(&digits[..8], "Z").unwrap(),
            format!("{day}T00:00:00Z")
        );
    }
}

fn library() -> &'static MappingSet {
    static SET: OnceLock<MappingSet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mappings/hl7v2");
        MappingSet::load(&dir).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// A synthetic admission with a value in most date/time fields; `(segment, field)` pairs below
/// point into it.
const ADMISSION: [&str; 7] = [
    "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ADT^A01^ADT_A01|PROP-1|P|2.5.1",
    "EVN|A01|20261123081500-0600|||||RIVERSIDE",
    "PID|1||MRN70001^^^RIVERSIDE^MR||Sample^Pat^Q^^^^L||19800101|F|||1 Main St^^Springfield^IL^62701^USA^H||^PRN^PH^^^217^5550100|||||||||||||20261201",
    "PV1|1|I|4WEST^401^A^RIVERSIDE||||1234^Attending^Ann|||MED||||||||I|V70001|||||||||||||||||||||||||20261123081500-0600|20261125",
    "AL1|1|DA|70618^Penicillin^RXNORM|SV|Hives|20200101",
    "DG1|1||I10^Hypertension^I10|||A|||||||||||||20261123",
    "IN1|1|GOLD^Gold Plan|INS42^^^PAYERS^NIIP|Synthetic Insurance||||||||20260101|20261231",
];

/// Fields a sender controls that the library reads, dates and text alike.
const TARGETS: [(usize, usize); 16] = [
    (0, 7),
    (1, 2),
    (2, 3),
    (2, 5),
    (2, 7),
    (2, 8),
    (2, 11),
    (2, 13),
    (2, 29),
    (3, 3),
    (3, 44),
    (3, 45),
    (4, 6),
    (5, 19),
    (6, 12),
    (6, 13),
];

/// Keys whose string values are FHIR `date`, `dateTime` or `instant` in what the library writes.
const DATE_KEYS: [&str; 12] = [
    "birthDate",
    "deceasedDateTime",
    "start",
    "end",
    "onsetDateTime",
    "recordedDate",
    "recorded",
    "issued",
    "effectiveDateTime",
    "authoredOn",
    "occurrenceDateTime",
    "lastUpdated",
];

fn with_field(seg: usize, field: usize, value: &str) -> String {
    let mut lines: Vec<String> = ADMISSION.iter().map(|s| s.to_string()).collect();
    let mut parts: Vec<String> = lines[seg].split('|').map(str::to_string).collect();
    // MSH-1 is the field separator itself: MSH-n is parts[n - 1]
    let at = if seg == 0 { field - 1 } else { field };
    if parts.len() <= at {
        parts.resize(at + 1, String::new());
    }
    parts[at] = value.to_string();
    lines[seg] = parts.join("|");
    lines.join("\r") + "\r"
}

fn check_dates(v: &Value, path: &str, bad: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = format!("{path}.{k}");
                match x {
                    Value::String(s) if DATE_KEYS.contains(&k.as_str()) => {
                        if !valid(&r4().date_time, s) {
                            bad.push(format!("{p} = {s:?}"));
                        }
                    }
                    _ => check_dates(x, &p, bad),
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_dates(x, &format!("{path}[{i}]"), bad);
            }
        }
        _ => {}
    }
}

#[test]
fn the_unmodified_admission_maps_with_its_dates() {
    let out = library()
        .map_bytes(
            with_field(2, 7, "19800101").as_bytes(),
            tributary_terminology::builtin(),
            &RunOptions::default(),
        )
        .unwrap();
    let patient = out.resources().find(|(t, _, _)| *t == "Patient").unwrap().2;
    assert_eq!(patient["birthDate"], "1980-01-01");
    let mut bad = Vec::new();
    check_dates(&out.bundle(), "Bundle", &mut bad);
    assert!(bad.is_empty(), "{bad:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    /// Any value in any of the target fields (separators, escapes, non-ASCII, DTM-shaped
    /// nonsense): the message maps or fails with an error, and every date the output carries is
    /// valid R4.
    #[test]
    fn hostile_field_values_never_panic_or_produce_invalid_dates(
        target in proptest::sample::select(TARGETS.to_vec()),
        value in prop_oneof![
            dtm_edges(),
            dtm_like(),
            "[0-9A-Za-z ^~&\\\\+.\\-é]{0,24}",
            any::<String>().prop_map(|s| s.replace(['\r', '\n'], "")),
        ],
    ) {
        let msg = with_field(target.0, target.1, &value);
        let out = library().map_bytes(
            msg.as_bytes(),
            tributary_terminology::builtin(),
            &RunOptions::default(),
        );
        if let Ok(out) = out {
            let mut bad = Vec::new();
            check_dates(&out.bundle(), "Bundle", &mut bad);
            prop_assert!(bad.is_empty(), "{:?} in field {:?} gave {:?}", value, target, bad);
        }
    }
}

/// The library's files as `MappingSet::load` reads them.
fn library_texts() -> Vec<(std::path::PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mappings/hl7v2");
    MappingSet::texts(&root).unwrap_or_else(|e| panic!("{e}"))
}

/// One edit an analyst could make by mistake.
#[derive(Debug, Clone)]
enum Edit {
    /// The text after the first `:` of a line replaced.
    Value(String),
    Delete,
    Insert(String),
    /// Indentation changed by this many spaces (negative: removed).
    Indent(i8),
    /// The file cut after this many characters of the line.
    Truncate,
}

fn edit() -> impl Strategy<Value = Edit> {
    let text = prop_oneof![
        "[A-Z]{2,3}-[0-9]{1,2}(\\.[0-9]{1,2})?(\\[[0-9*]\\])?",
        "[ -~]{0,30}",
        "\\{\\{?[ a-z.()|'-]{0,20}\\}?\\}?",
        any::<String>().prop_map(|s| s.replace(['\r', '\n'], " ")),
    ];
    prop_oneof![
        4 => text.clone().prop_map(Edit::Value),
        1 => Just(Edit::Delete),
        1 => text.prop_map(Edit::Insert),
        1 => (-4i8..=4).prop_map(Edit::Indent),
        1 => Just(Edit::Truncate),
    ]
}

fn apply(text: &str, line: usize, e: &Edit) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let i = line % lines.len().max(1);
    match e {
        Edit::Value(v) => {
            if let Some((k, _)) = lines[i].split_once(':') {
                lines[i] = format!("{k}: {v}");
            }
        }
        Edit::Delete => {
            lines.remove(i);
        }
        Edit::Insert(v) => lines.insert(i, v.clone()),
        Edit::Indent(n) if *n >= 0 => lines[i] = " ".repeat(*n as usize) + &lines[i],
        Edit::Indent(n) => {
            let cut = lines[i].len() - lines[i].trim_start().len();
            lines[i] = lines[i][cut.min(n.unsigned_abs() as usize)..].to_string();
        }
        Edit::Truncate => {
            lines.truncate(i + 1);
            let keep = lines[i].chars().count() / 2;
            lines[i] = lines[i].chars().take(keep).collect();
        }
    }
    lines.join("\n") + "\n"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A mistaken edit anywhere in the library: loading never panics, and each error points at a
    /// line and column of a file of the set.
    #[test]
    fn a_broken_library_file_gives_positioned_errors_never_a_panic(
        file in any::<usize>(),
        line in any::<usize>(),
        e in edit(),
    ) {
        let mut texts = library_texts();
        let n = file % texts.len();
        texts[n].1 = apply(&texts[n].1, line, &e);
        let root = Path::new("lib");
        if let Err(errors) = MappingSet::from_texts(root, &texts) {
            let bad = positions::misplaced(root, &texts, &errors);
            prop_assert!(bad.is_none(), "{} ({:?})", bad.unwrap_or_default(), e);
        }
    }
}

#[test]
fn the_library_loads_from_its_texts_unchanged() {
    let texts = library_texts();
    assert!(texts.len() > 20, "{} files", texts.len());
    MappingSet::from_texts(Path::new("lib"), &texts).unwrap_or_else(|e| panic!("{e}"));
}
