//! YAML read the way kube-proxy's lenient decoding reads it. kube-proxy
//! first decodes its `--config` file strictly; when that fails on a key
//! given twice in one mapping, it decodes again without strictness, where
//! Go's YAML decoder overwrites the map entry: the last value wins. serde's
//! `Value` refuses such a document outright, so the document is read here
//! with every entry kept, then folded with the last value winning, and the
//! repeated keys are returned for the caller to warn about.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_yaml::{Mapping, Value};

/// Parses `text` (one YAML document). Returns the document and the dotted
/// paths of the keys that were given more than once.
pub fn parse(text: &str) -> Result<(Value, Vec<String>), serde_yaml::Error> {
    let node = Node::deserialize(serde_yaml::Deserializer::from_str(text))?;
    let mut duplicates = Vec::new();
    let value = node.fold("", &mut duplicates);
    Ok((value, duplicates))
}

/// The name of a mapping key in a dotted path.
pub fn key_name(k: &Value) -> String {
    k.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{k:?}"))
}

/// A YAML node whose mappings keep every entry, repeated keys included.
enum Node {
    Leaf(Value),
    Seq(Vec<Node>),
    Map(Vec<(Value, Node)>),
}

impl Node {
    fn fold(self, path: &str, duplicates: &mut Vec<String>) -> Value {
        match self {
            Node::Leaf(v) => v,
            Node::Seq(items) => Value::Sequence(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, n)| n.fold(&format!("{path}[{i}]"), duplicates))
                    .collect(),
            ),
            Node::Map(entries) => {
                let mut m = Mapping::new();
                for (k, n) in entries {
                    let name = key_name(&k);
                    let p = if path.is_empty() {
                        name
                    } else {
                        format!("{path}.{name}")
                    };
                    let v = n.fold(&p, duplicates);
                    // Replaces the earlier value in place: the last one wins.
                    if m.insert(k, v).is_some() && !duplicates.contains(&p) {
                        duplicates.push(p);
                    }
                }
                Value::Mapping(m)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Leaf(Value::Bool(b)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Node, E> {
        Ok(Node::Leaf(Value::Number(n.into())))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Node, E> {
        Ok(Node::Leaf(Value::Number(n.into())))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Node, E> {
        Ok(Node::Leaf(Value::Number(n.into())))
    }

    fn visit_str<E>(self, s: &str) -> Result<Node, E> {
        Ok(Node::Leaf(Value::String(s.to_string())))
    }

    fn visit_string<E>(self, s: String) -> Result<Node, E> {
        Ok(Node::Leaf(Value::String(s)))
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Leaf(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Leaf(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element()? {
            items.push(n);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = map.next_key::<Value>()? {
            entries.push((k, map.next_value()?));
        }
        Ok(Node::Map(entries))
    }

    // A tagged value (`!tag x`): kept as serde_yaml represents it.
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Node, A::Error> {
        Value::deserialize(de::value::EnumAccessDeserializer::new(data)).map(Node::Leaf)
    }
}
