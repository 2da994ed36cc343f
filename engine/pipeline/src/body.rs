//! Mapped resources handed to the store in the mapping runner's own tree: the store serializes,
//! hashes and indexes them without a `serde_json::Value` being built and freed per resource.

use tributary_mapping::{MappedResource, ResourceView};
use tributary_storage::{IndexFields, JsonView, ResourceBody};

#[derive(Debug)]
pub(crate) struct MappedBody(pub MappedResource);

impl ResourceBody for MappedBody {
    fn write_json(&self, out: &mut Vec<u8>) {
        self.0.write_json(out);
    }

    fn write_stamped(&self, out: &mut Vec<u8>, version: &str, last_updated: &str) {
        self.0.write_stamped(out, version, last_updated);
    }

    fn index_fields(&self, rtype: &str, id: &str) -> IndexFields {
        IndexFields::of(rtype, id, View(self.0.view()))
    }
}

#[derive(Clone, Copy)]
struct View<'a>(ResourceView<'a>);

impl<'a> JsonView<'a> for View<'a> {
    fn get(self, key: &str) -> Option<Self> {
        self.0.get(key).map(View)
    }
    fn as_str(self) -> Option<&'a str> {
        self.0.as_str()
    }
    fn array_len(self) -> Option<usize> {
        self.0.array_len()
    }
    fn element(self, index: usize) -> Option<Self> {
        self.0.element(index).map(View)
    }
    fn is_object(self) -> bool {
        self.0.is_object()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;
    use tributary_mapping::{MappingSet, RunOptions};
    use tributary_storage::{Db, DbOptions, FjallStore, ResourceWrite, Store, StoreTransaction};

    fn library() -> (MappingSet, std::path::PathBuf) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mappings/hl7v2");
        (MappingSet::load(&dir).expect("library loads"), dir)
    }

    async fn commit(store: &FjallStore, w: ResourceWrite) -> tributary_storage::WriteOutcome {
        let tx = StoreTransaction {
            tenant: "t1".into(),
            writes: vec![w],
            ..Default::default()
        };
        store.commit(tx).await.unwrap().writes.remove(0)
    }

    /// Every resource the library maps from its own fixtures (and from an ADT^A01 with MSH-8
    /// security and MSH-21 profile tags, for a mapped `meta`) is stored, hashed and indexed
    /// exactly as the same resource as a `serde_json::Value` through the API would be.
    #[tokio::test]
    async fn a_mapped_body_is_stored_hashed_and_indexed_as_its_value_would_be() {
        let (set, dir) = library();
        let mut messages: Vec<Vec<u8>> = std::fs::read_dir(dir.join("messages"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "hl7"))
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        assert!(messages.len() >= 20, "the library's fixtures are there");
        let adt = std::fs::read(dir.join("messages/ADT_A01.hl7")).unwrap();
        let adt = String::from_utf8(adt).unwrap();
        let msh: Vec<&str> = adt.split('\r').next().unwrap().split('|').collect();
        let mut fields: Vec<String> = msh.iter().map(|s| s.to_string()).collect();
        fields.resize(fields.len().max(22), String::new());
        fields[7] = "RESTRICTED".into(); // MSH-8 (MSH-1 is the separator itself)
        fields[20] = "PROFILE-1^^2.16.840.1.113883.9.1^ISO".into(); // MSH-21
        let with_meta = adt.replacen(&msh.join("|"), &fields.join("|"), 1);
        messages.push(with_meta.into_bytes());

        let tmp = tempfile::tempdir().unwrap();
        let (by_body, by_value) = (tmp.path().join("body"), tmp.path().join("value"));
        let by_body = FjallStore::new(Db::open(&by_body, DbOptions::default()).unwrap());
        let by_value = FjallStore::new(Db::open(&by_value, DbOptions::default()).unwrap());
        let term = tributary_terminology::builtin();
        let opts = RunOptions {
            tenant: "t1",
            lineage: false,
            feed: None,
        };
        let (mut resources, mut with_mapped_meta) = (0, 0);
        for (n, msg) in messages.iter().enumerate() {
            let mut mapped = set.map_bytes(msg, term, &opts).expect("fixture maps");
            for r in mapped.take_resources() {
                let (rtype, id) = (r.resource_type, r.id.clone());
                let value = r.clone().into_value();
                let body = Arc::new(MappedBody(r));
                assert_eq!(body.to_json(), serde_json::to_vec(&value).unwrap());
                assert_eq!(
                    body.index_fields(rtype, &id),
                    IndexFields::of(rtype, &id, &value)
                );
                with_mapped_meta += usize::from(value.get("meta").is_some());
                // Resources recur across fixtures (the same practitioner): each store sees the
                // same sequence of writes, so versions stay in step.
                let v = commit(&by_value, ResourceWrite::upsert(rtype, &id, value.clone())).await;
                let b = commit(
                    &by_body,
                    ResourceWrite::upsert_body(rtype, &id, body.clone()),
                )
                .await;
                assert_eq!(
                    (b.version, b.changed),
                    (v.version, v.changed),
                    "{n}: {rtype}"
                );
                if b.changed {
                    let stored: serde_json::Value = serde_json::from_slice(&v.json).unwrap();
                    let mut own = Vec::new();
                    body.write_stamped(
                        &mut own,
                        stored["meta"]["versionId"].as_str().unwrap(),
                        stored["meta"]["lastUpdated"].as_str().unwrap(),
                    );
                    assert_eq!(
                        String::from_utf8(own).unwrap(),
                        String::from_utf8(v.json.to_vec()).unwrap()
                    );
                }
                // The same content the other way round is no change: the hashes agree.
                let again = commit(&by_body, ResourceWrite::upsert(rtype, &id, value)).await;
                assert!(!again.changed, "{n}: {rtype}/{id} hashed differently");
                resources += 1;
            }
        }
        assert!(resources > 100, "{resources} resources compared");
        assert!(with_mapped_meta > 0, "a mapped meta is among them");
    }
}
