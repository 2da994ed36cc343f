//! The FHIRPath Patch a `write: merge` entry is in the transaction Bundle: what the store does
//! with it (`tributary_storage`'s merge), said in FHIR terms so the Bundle stays a faithful,
//! replayable description. A single element is deleted and added again; each list item first
//! deletes the stored item with the same values (there may be more in it) and is then added, so
//! applying the patch twice gives what applying it once gave.

use crate::fhir;
use serde_json::{json, Map, Value};

/// Complex datatypes a Parameters `value[x]` can carry (R4's open types; every primitive can).
/// A backbone element's value is given as one part per child instead.
const OPEN_COMPLEX: [&str; 31] = [
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "CodeableConcept",
    "Coding",
    "ContactDetail",
    "ContactPoint",
    "Contributor",
    "Count",
    "DataRequirement",
    "Distance",
    "Dosage",
    "Duration",
    "Expression",
    "HumanName",
    "Identifier",
    "Meta",
    "Money",
    "ParameterDefinition",
    "Period",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "RelatedArtifact",
    "SampledData",
    "Signature",
    "Timing",
    "TriggerDefinition",
    "UsageContext",
];

/// The FHIRPath Patch (a `Parameters` resource) merging `resource`'s elements into the stored
/// `rtype` resource.
pub(crate) fn merge_patch(rtype: &str, resource: &Value) -> Value {
    let mut ops = Vec::new();
    for (name, v) in resource.as_object().into_iter().flatten() {
        if name == "resourceType" || name == "id" {
            continue;
        }
        let (ty, many) = match fhir::element(rtype, name) {
            Some(e) => (e.ty, e.many),
            None => ("string", v.is_array()),
        };
        match v {
            Value::Array(items) if many => {
                for item in items {
                    let path = format!("{rtype}.{name}.where({})", same_values(item, ty));
                    ops.push(operation("delete", path, None));
                    ops.push(operation(
                        "add",
                        rtype.into(),
                        Some((name, value("value", item, ty))),
                    ));
                }
            }
            _ => {
                ops.push(operation("delete", format!("{rtype}.{name}"), None));
                ops.push(operation(
                    "add",
                    rtype.into(),
                    Some((name, value("value", v, ty))),
                ));
            }
        }
    }
    json!({"resourceType": "Parameters", "parameter": ops})
}

fn operation(kind: &str, path: String, add: Option<(&str, Value)>) -> Value {
    let mut part = vec![
        json!({"name": "type", "valueCode": kind}),
        json!({"name": "path", "valueString": path}),
    ];
    if let Some((name, v)) = add {
        part.push(json!({"name": "name", "valueString": name}));
        part.push(v);
    }
    json!({"name": "operation", "part": part})
}

/// A Parameters part named `name` carrying `v` of FHIR type `ty`.
fn value(name: &str, v: &Value, ty: &str) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), name.into());
    if fhir::is_primitive(ty) || OPEN_COMPLEX.contains(&ty) {
        let mut chars = ty.chars();
        let upper: String = chars
            .next()
            .map(|c| c.to_ascii_uppercase())
            .into_iter()
            .chain(chars)
            .collect();
        m.insert(format!("value{upper}"), v.clone());
    } else {
        let mut parts = Vec::new();
        for (k, cv) in v.as_object().into_iter().flatten() {
            let cty = fhir::element(ty, k).map_or("string", |e| e.ty);
            match cv {
                Value::Array(items) => parts.extend(items.iter().map(|i| value(k, i, cty))),
                _ => parts.push(value(k, cv, cty)),
            }
        }
        m.insert("part".into(), Value::Array(parts));
    }
    Value::Object(m)
}

/// A FHIRPath condition true of an item that has every value `v` has (it may have more).
fn same_values(v: &Value, ty: &str) -> String {
    let mut conds = Vec::new();
    match v.as_object() {
        Some(obj) => {
            for (k, cv) in obj {
                let (cty, many) =
                    fhir::element(ty, k).map_or(("string", cv.is_array()), |e| (e.ty, e.many));
                let items: Vec<&Value> = match cv {
                    Value::Array(a) => a.iter().collect(),
                    x => vec![x],
                };
                for item in items {
                    if item.is_object() {
                        conds.push(format!("{k}.where({}).exists()", same_values(item, cty)));
                    } else if many {
                        conds.push(format!("{k} contains {}", literal(item, cty)));
                    } else {
                        conds.push(format!("{k} = {}", literal(item, cty)));
                    }
                }
            }
        }
        None => conds.push(format!("$this = {}", literal(v, ty))),
    }
    if conds.is_empty() {
        "true".into()
    } else {
        conds.join(" and ")
    }
}

/// A FHIRPath literal of a primitive value of FHIR type `ty`.
fn literal(v: &Value, ty: &str) -> String {
    match v {
        Value::String(s) => match ty {
            "date" | "dateTime" | "instant" => format!("@{s}"),
            "time" => format!("@T{s}"),
            _ => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_is_a_replayable_fhirpath_patch() {
        let merged = json!({"resourceType": "Patient", "id": "p1", "active": false,
            "identifier": [{"system": "urn:mrn", "value": "O'Neil-1", "period": {"start": "2020-01"}}],
            "name": [{"family": "Doe", "given": ["Ann", "B"]}],
            "link": [{"other": {"reference": "Patient/p2"}, "type": "replaced-by"}]});
        let p = merge_patch("Patient", &merged);
        assert_eq!(p["resourceType"], "Parameters");
        let ops: Vec<(String, String, Value)> = p["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let part = o["part"].as_array().unwrap();
                (
                    part[0]["valueCode"].as_str().unwrap().to_string(),
                    part[1]["valueString"].as_str().unwrap().to_string(),
                    part.get(3).cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        let paths: Vec<(&str, &str)> = ops
            .iter()
            .map(|(t, p, _)| (t.as_str(), p.as_str()))
            .collect();
        assert_eq!(
            paths,
            [
                ("delete", "Patient.active"),
                ("add", "Patient"),
                ("delete", "Patient.identifier.where(period.where(start = @2020-01).exists() and system = 'urn:mrn' and value = 'O\\'Neil-1')"),
                ("add", "Patient"),
                ("delete", "Patient.link.where(other.where(reference = 'Patient/p2').exists() and type = 'replaced-by')"),
                ("add", "Patient"),
                ("delete", "Patient.name.where(family = 'Doe' and given contains 'Ann' and given contains 'B')"),
                ("add", "Patient"),
            ]
        );
        assert_eq!(ops[1].2, json!({"name": "value", "valueBoolean": false}));
        assert_eq!(ops[3].2["valueIdentifier"]["value"], "O'Neil-1");
        assert_eq!(ops[7].2["valueHumanName"]["given"], json!(["Ann", "B"]));
        // PatientLink is a backbone element: its children are parts
        assert_eq!(
            ops[5].2,
            json!({"name": "value", "part": [
                {"name": "other", "valueReference": {"reference": "Patient/p2"}},
                {"name": "type", "valueCode": "replaced-by"}]})
        );
    }
}
