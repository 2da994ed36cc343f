//! A YAML document as a tree whose every node knows its line and column, so load errors can point
//! an analyst at `file:line:col`. Built on `yaml-rust2`'s marked event stream.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based position in a mapping file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// A scalar's text; `quoted` is true for '…' or "…" (never a number, bool or null).
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            Kind::Map(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.kind {
            Kind::Seq(s) => Some(s),
            _ => None,
        }
    }
    /// The value under `key` in a map node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }
}

fn pos(m: &Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Node, Option<Node>)>,
    root: Option<Node>,
    error: Option<(Pos, String)>,
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some((parent, pending_key)) => match &mut parent.kind {
                Kind::Seq(items) => items.push(node),
                Kind::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(k) => entries.push((k, node)),
                },
                Kind::Scalar { .. } => {}
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, style, _, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push_value(Node {
                    kind: Kind::Scalar { text, quoted },
                    pos: pos(&mark),
                })
            }
            Event::SequenceStart(..) => self.stack.push((
                Node {
                    kind: Kind::Seq(Vec::new()),
                    pos: pos(&mark),
                },
                None,
            )),
            Event::MappingStart(..) => self.stack.push((
                Node {
                    kind: Kind::Map(Vec::new()),
                    pos: pos(&mark),
                },
                None,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, _)) = self.stack.pop() {
                    self.push_value(node);
                }
            }
            Event::Alias(_) if self.error.is_none() => {
                self.error = Some((
                    pos(&mark),
                    "YAML aliases are not supported in mapping files".into(),
                ));
            }
            _ => {}
        }
    }
}

/// Parses one YAML document; errors carry the position the YAML scanner stopped at.
pub fn parse(text: &str) -> Result<Node, (Pos, String)> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|e| (pos(e.marker()), e.info().to_string()))?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.root.unwrap_or(Node {
        kind: Kind::Map(Vec::new()),
        pos: Pos { line: 1, col: 1 },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_know_their_positions() {
        let doc = parse("segment: PID\nrules:\n  - set: gender\n    from: PID-8\n").unwrap();
        let rules = doc.get("rules").unwrap().as_seq().unwrap();
        let from = rules[0].get("from").unwrap();
        assert_eq!(from.as_str(), Some("PID-8"));
        assert_eq!(from.pos, Pos { line: 4, col: 11 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let (p, msg) = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(p.line >= 2, "{p:?} {msg}");
    }
}
