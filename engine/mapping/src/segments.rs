//! HL7 v2.5.1 segment field datatypes for the segments the library maps, so a path like
//! `PID-40` or `map: XPN` on `PID-3` (a CX) is a load error rather than a silent no-op.
//! Segments not listed here (Z-segments, rarer ones) are not checked.

/// `SEG: type of field 1, field 2, …` (`-` for a field whose type varies, like OBX-5).
const TABLE: &str = "\
MSH: ST ST HD HD HD HD TS ST MSG ST PT VID NM ST ID ID ID ID CE ID EI EI XON XON XAD XAD
EVN: ID TS TS IS XCN TS HD
PID: SI CX CX CX XPN XPN TS IS XPN CE XAD IS XTN XTN CE CE CE CX ST DLN CX CE ST ID NM CE CE CE TS ID ID IS TS HD CE CE ST CE CE
PD1: IS IS XON XCN IS ID IS ID CE XON CE CE TS
NK1: SI XPN CE XAD XTN XTN CE DT DT IS JCC CX XON CE IS TS IS IS IS CE ID IS CE IS CE IS XPN CE CE XPN XTN XAD CX IS CE ST IS IS IS
PV1: SI IS PL IS CX PL XCN XCN XCN IS PL IS IS IS IS IS XCN IS CX FC IS IS IS IS DT NM NM IS IS DT IS NM NM IS DT IS DLD CE IS IS IS PL PL TS TS NM NM NM NM CX IS XCN
PV2: PL CE CE CE ST ST IS TS TS NM NM ST XCN DT ID IS TS IS ID ID IS IS XON IS IS DT DT DT IS IS CE ID ID ID ID ID ID TS ID CE CE
MRG: CX CX CX CX CX CX XPN
AL1: SI CE CE CE ST DT
DG1: SI ID CE ST TS IS CE CE ID IS CE NM CP ST ID XCN IS ID TS EI ID
IN1: SI CE CX XON XAD XPN XTN ST XON CX XON DT DT AUI IS XPN CE TS XAD IS IS ST ID DT ID DT IS ST TS XCN IS IS NM NM IS ST CP CP NM CP CP CE IS XAD ST IS IS IS CX IS DT ST IS
GT1: SI CX XPN XPN XAD XTN XTN TS IS IS CE ST ID DT DT NM XPN XTN XAD XTN CX IS XON ID CE DT ID CE CE CX CE XPN ID CE CE CE CE IS IS IS IS CE IS CE XPN XTN XON IS TS ID ID CE CE CE CE
ROL: EI ID CE XCN TS TS CE CE XAD XTN
OBR: SI EI EI CE ID TS TS TS CQ XCN ID CE ST TS SPS XCN XTN ST ST ST ST TS MOC ID ID PRL TQ XCN EIP ID CE NDL NDL NDL NDL TS NM CE CE CE ID ID CE CE CE CE CE CWE IS CWE
ORC: ID EI EI EI ID ID TQ EIP TS XCN XCN XCN PL XTN TS CE CE CE XCN CE XON XAD XTN XAD CWE CWE CWE CWE CWE CWE
OBX: SI ID CE ST - CE ST IS NM ID ID TS ST TS CE XCN CE EI TS CWE EI CNE XON XAD XCN
NTE: SI ID FT CE
SPM: SI EIP EIP CWE CWE CWE CWE CWE CWE CWE CWE CQ NM ST CWE CWE DR TS TS ID CWE CWE CWE CWE CQ NM CWE CWE CWE CX CWE EI
RXA: NM NM TS TS CE NM CE CE CE XCN LA2 ST NM CE ST TS CE CE CE ID ID TS NM CWE CWE CWE
RXR: CE CWE CE CWE CWE CWE
TXA: SI IS ID TS XCN TS TS TS XCN XCN XCN EI EI EI EI ST ID ID ID ID XCN ID ST PPN CE
SCH: EI EI NM EI EI CE CE CE NM CE TQ XCN XTN XAD PL XCN XTN PL XCN XTN XAD XCN XTN XAD PL EI EI CE EI EI
AIS: SI ID CE TS NM CE NM CE IS CE
AIL: SI ID PL CE CE TS NM CE NM CE IS CE
AIP: SI ID XCN CE CE TS NM CE NM CE IS CE
AIG: SI ID CE CE CE NM CE TS NM CE NM CE IS CE
RGS: SI ID CE
TQ1: SI CQ RPT TM CQ CQ TS TS CWE TX TX CWE CQ NM
PRT: EI ID CWE CWE CWE XCN CWE HD PL EI TS TS PPN XAD XTN
SFT: XON ST ST ST TX DT
";

/// The datatype of `seg`-`field`: `Some(None)` when the segment is known but the field varies or
/// lies beyond the table's last field (later versions add fields); `None` for unknown segments.
pub fn field_type(seg: &str, field: usize) -> Option<Option<&'static str>> {
    let line = TABLE
        .lines()
        .find(|l| l.starts_with(seg) && l.as_bytes().get(3) == Some(&b':'))?;
    Some(
        line[4..]
            .split_whitespace()
            .nth(field.checked_sub(1)?)
            .filter(|t| *t != "-"),
    )
}

/// Number of fields the table lists for a known segment.
pub fn field_count(seg: &str) -> Option<usize> {
    let line = TABLE
        .lines()
        .find(|l| l.starts_with(seg) && l.as_bytes().get(3) == Some(&b':'))?;
    Some(line[4..].split_whitespace().count())
}

/// Datatypes a map written for `map_type` accepts (CE/CWE/CNE are interchangeable, TS/DTM too).
pub fn compatible(field_type: &str, map_type: &str) -> bool {
    fn family(t: &str) -> &str {
        match t {
            "CE" | "CWE" | "CNE" => "CWE",
            "TS" | "DTM" | "DT" => "DTM",
            "XCN" | "XPN" | "CN" => t,
            "EI" | "EIP" => "EI",
            _ => t,
        }
    }
    family(field_type) == family(map_type) || (family(map_type) == "EI" && field_type == "EIP")
}
