//! What the mapping runner reads: an HL7 v2 message as segments → fields → repetitions →
//! components → subcomponents, all numbered from 1 as analysts number them. The parser crate's
//! message implements [`V2Source`]; so does the tiny [`SplitMessage`] used by unit tests.

use std::borrow::Cow;

pub trait V2Source {
    fn segment_count(&self) -> usize;
    /// Three-letter segment id of segment `seg` (0-based index in the message).
    fn segment_name(&self, seg: usize) -> &str;
    /// Highest field number present (for MSH, field 1 is the field separator).
    fn field_count(&self, seg: usize) -> usize;
    fn rep_count(&self, seg: usize, field: usize) -> usize;
    fn comp_count(&self, seg: usize, field: usize, rep: usize) -> usize;
    fn sub_count(&self, seg: usize, field: usize, rep: usize, comp: usize) -> usize;
    /// The unescaped text of one leaf; `None` when absent. The HL7 null `""` is returned as `""`.
    fn leaf(
        &self,
        seg: usize,
        field: usize,
        rep: usize,
        comp: usize,
        sub: usize,
    ) -> Option<Cow<'_, str>>;
}

/// A minimal splitter for tests and fixtures-free unit checks: `|^~\&`, CR or LF segments, no
/// escape handling. Production code uses the `tributary-hl7v2` parser.
/// Fields → repetitions → components → subcomponents.
type Fields = Vec<Vec<Vec<Vec<String>>>>;

pub struct SplitMessage {
    segments: Vec<(String, Fields)>,
}

impl SplitMessage {
    pub fn parse(text: &str) -> Self {
        let mut segments = Vec::new();
        for line in text.split(['\r', '\n']).filter(|l| l.len() >= 3) {
            let name = line[..3].to_string();
            let mut fields: Fields = Vec::new();
            let rest: Vec<&str> = line.split('|').skip(1).collect();
            if name == "MSH" {
                fields.push(vec![vec![vec!["|".into()]]]);
                fields.push(vec![vec![vec![rest.first().copied().unwrap_or("").into()]]]);
                for f in rest.iter().skip(1) {
                    fields.push(split_field(f));
                }
            } else {
                for f in rest {
                    fields.push(split_field(f));
                }
            }
            segments.push((name, fields));
        }
        Self { segments }
    }
}

fn split_field(f: &str) -> Vec<Vec<Vec<String>>> {
    f.split('~')
        .map(|r| {
            r.split('^')
                .map(|c| c.split('&').map(str::to_string).collect())
                .collect()
        })
        .collect()
}

impl V2Source for SplitMessage {
    fn segment_count(&self) -> usize {
        self.segments.len()
    }
    fn segment_name(&self, seg: usize) -> &str {
        &self.segments[seg].0
    }
    fn field_count(&self, seg: usize) -> usize {
        self.segments[seg].1.len()
    }
    fn rep_count(&self, seg: usize, field: usize) -> usize {
        self.segments[seg]
            .1
            .get(field.wrapping_sub(1))
            .map_or(0, Vec::len)
    }
    fn comp_count(&self, seg: usize, field: usize, rep: usize) -> usize {
        self.segments[seg]
            .1
            .get(field.wrapping_sub(1))
            .and_then(|f| f.get(rep.wrapping_sub(1)))
            .map_or(0, Vec::len)
    }
    fn sub_count(&self, seg: usize, field: usize, rep: usize, comp: usize) -> usize {
        self.segments[seg]
            .1
            .get(field.wrapping_sub(1))
            .and_then(|f| f.get(rep.wrapping_sub(1)))
            .and_then(|r| r.get(comp.wrapping_sub(1)))
            .map_or(0, Vec::len)
    }
    fn leaf(
        &self,
        seg: usize,
        field: usize,
        rep: usize,
        comp: usize,
        sub: usize,
    ) -> Option<Cow<'_, str>> {
        self.segments[seg]
            .1
            .get(field.wrapping_sub(1))?
            .get(rep.wrapping_sub(1))?
            .get(comp.wrapping_sub(1))?
            .get(sub.wrapping_sub(1))
            .map(|s| Cow::Borrowed(s.as_str()))
    }
}
