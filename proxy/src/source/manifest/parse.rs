//! One manifest file's text to typed Kubernetes objects, plus everything
//! wrong with it. No I/O and no model validation here.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::debug;

use crate::model::{Kind, Object, ObjectKey, Rejection};

pub(crate) const REASON_PARSE_ERROR: &str = "parse_error";
pub(crate) const REASON_UNKNOWN_FIELD: &str = "unknown_field";
pub(crate) const REASON_INVALID_API_VERSION: &str = "invalid_api_version";
pub(crate) const REASON_DUPLICATE_OBJECT: &str = "duplicate_object";

/// The kind a manifest names, if kproxy reads it.
fn kind_of(kind: &str) -> Option<Kind> {
    match kind {
        "Service" => Some(Kind::Service),
        "EndpointSlice" => Some(Kind::EndpointSlice),
        "Node" => Some(Kind::Node),
        _ => None,
    }
}

fn api_version_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Service | Kind::Node => "v1",
        Kind::EndpointSlice => "discovery.k8s.io/v1",
    }
}

/// One typed object and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Document {
    pub key: ObjectKey,
    pub object: Object,
    /// `path, document N` (plus `, items[I]` inside a List).
    pub origin: String,
}

/// What parsing one file yields.
#[derive(Debug, Default)]
pub(crate) struct ParsedFile {
    /// Objects that parsed cleanly, in file order (not validated yet).
    pub documents: Vec<Document>,
    /// Parse-level problems; any of them makes the file count as broken.
    pub rejections: Vec<Rejection>,
}

/// How much a typed conversion records about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// No field paths: tracking them costs an allocation per mapping key
    /// (a tenth of a clean file's parse). A failure only says so.
    Fast,
    /// The field path of every failure, for the rejection.
    Exact,
}

/// Parses every YAML document of a file (`rel` is its path relative to the
/// manifest directory, used in origins).
pub(crate) fn parse_file(rel: &str, text: &str) -> ParsedFile {
    // Nearly every file converts cleanly; one that does not is parsed once
    // more, naming the field of each failure.
    parse_file_with(rel, text, Detail::Fast)
        .unwrap_or_else(|| parse_file_with(rel, text, Detail::Exact).unwrap_or_default())
}

/// `None` when a typed conversion failed in `Detail::Fast`.
fn parse_file_with(rel: &str, text: &str, detail: Detail) -> Option<ParsedFile> {
    let mut out = ParsedFile::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = format!("{rel}, document {}", i + 1);
        match Value::deserialize(doc) {
            Ok(Value::Null) => {} // empty document (`---` twice, comments only)
            Ok(value) => parse_value(value, &origin, None, detail, &mut out).ok()?,
            Err(e) => {
                let origin = match e.location() {
                    Some(l) => format!("{origin}, line {}:{}", l.line(), l.column()),
                    None => origin,
                };
                out.rejections.push(rejection(
                    "",
                    "",
                    "",
                    "",
                    REASON_PARSE_ERROR,
                    format!("invalid YAML: {e}"),
                    &origin,
                ));
                // The rest of the stream cannot be trusted after a syntax error.
                break;
            }
        }
    }
    Some(out)
}

/// A typed conversion failed without its details (`Detail::Fast`).
struct Inexact;

/// Kind and apiVersion given by a typed list (`ServiceList`) to items that omit them.
type ListDefault = (&'static str, &'static str);

fn parse_value(
    mut value: Value,
    origin: &str,
    list_default: Option<ListDefault>,
    detail: Detail,
    out: &mut ParsedFile,
) -> Result<(), Inexact> {
    let Some(map) = value.as_object_mut() else {
        out.rejections.push(rejection(
            "",
            "",
            "",
            "",
            REASON_PARSE_ERROR,
            format!(
                "expected a Kubernetes object (a mapping with apiVersion and kind), found {}",
                type_name(&value)
            ),
            origin,
        ));
        return Ok(());
    };
    if let Some((kind, api_version)) = list_default {
        map.entry("kind").or_insert_with(|| kind.into());
        map.entry("apiVersion")
            .or_insert_with(|| api_version.into());
    }
    let (mut namespace, name) = meta_names(map);
    let api_version = map.get("apiVersion").cloned();
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.clone(),
        None if api_version.is_none() => {
            // Not a Kubernetes manifest at all (a values file, compose file...).
            debug!(%origin, "ignoring document without apiVersion and kind");
            return Ok(());
        }
        other => {
            out.rejections.push(rejection(
                "",
                &namespace,
                &name,
                "kind",
                REASON_PARSE_ERROR,
                match other {
                    None => "missing kind: a document with apiVersion must say its kind".into(),
                    Some(v) => format!("kind must be a string, found {}", type_name(v)),
                },
                origin,
            ));
            return Ok(());
        }
    };

    if kind == "List" || kind.ends_with("List") {
        return parse_list(&kind, value, origin, detail, out);
    }
    let Some(known) = kind_of(&kind) else {
        debug!(%origin, %kind, "ignoring object of a kind kproxy does not use");
        return Ok(());
    };
    if known.namespaced() && namespace.is_empty() {
        namespace = "default".to_string();
    }
    if api_version.as_ref().and_then(Value::as_str) != Some(api_version_of(known)) {
        let found = match &api_version {
            None => "missing apiVersion".to_string(),
            Some(v) => format!("apiVersion {v} is not supported"),
        };
        out.rejections.push(rejection(
            known.as_str(),
            &namespace,
            &name,
            "apiVersion",
            REASON_INVALID_API_VERSION,
            format!(
                "{found} for {}: use apiVersion {:?}",
                known.as_str(),
                api_version_of(known)
            ),
            origin,
        ));
        return Ok(());
    }

    // Missing namespace means `default`, as kubectl would apply it.
    if known.namespaced() {
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), Value::String(namespace.clone()));
        }
    } else {
        namespace.clear();
    }
    let key = ObjectKey {
        kind: known,
        namespace,
        name,
    };
    let object = match known {
        Kind::Service => typed::<Service>(&key, value, origin, detail, out)?
            .map(|o| Object::Service(Arc::new(o))),
        Kind::EndpointSlice => typed::<EndpointSlice>(&key, value, origin, detail, out)?
            .map(|o| Object::EndpointSlice(Arc::new(o))),
        Kind::Node => {
            typed::<Node>(&key, value, origin, detail, out)?.map(|o| Object::Node(Arc::new(o)))
        }
    };
    if let Some(object) = object {
        out.documents.push(Document {
            key,
            object,
            origin: origin.to_string(),
        });
    }
    Ok(())
}

fn parse_list(
    kind: &str,
    value: Value,
    origin: &str,
    detail: Detail,
    out: &mut ParsedFile,
) -> Result<(), Inexact> {
    // `ServiceList` etc. may omit kind/apiVersion on items; `List` may not.
    let item_default = kind
        .strip_suffix("List")
        .and_then(kind_of)
        .map(|k| (k.as_str(), api_version_of(k)));
    let items = match value.get("items") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(items)) => items.clone(),
        Some(other) => {
            out.rejections.push(rejection(
                "",
                "",
                "",
                "items",
                REASON_PARSE_ERROR,
                format!(
                    "items of a {kind} must be a list, found {}",
                    type_name(other)
                ),
                origin,
            ));
            return Ok(());
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        if item.is_null() {
            continue;
        }
        let origin = format!("{origin}, items[{i}]");
        parse_value(item, &origin, item_default, detail, out)?;
    }
    Ok(())
}

/// Deserializes into the typed object, reporting type errors with their
/// field path (`Detail::Exact`; `Err` for any in `Detail::Fast`) and fields
/// the type does not know (strict validation).
fn typed<T: DeserializeOwned>(
    key: &ObjectKey,
    value: Value,
    origin: &str,
    detail: Detail,
    out: &mut ParsedFile,
) -> Result<Option<T>, Inexact> {
    let kind = key.kind.as_str();
    // Serde silently skips fields a type does not know; a typo like
    // `prot: 80` must not go unnoticed. `serde_ignored` names every value
    // the typed object skipped, in the same single pass.
    let mut unknown = Vec::new();
    let mut note = |path: &serde_ignored::Path<'_>| {
        let mut field = String::new();
        field_path(path, &mut field);
        unknown.push(field);
    };
    let result = if has_null(&value) {
        // A null value is "not set", whatever its key: look at the value of
        // each skipped field (rare; a borrowed document costs a copy of
        // every string).
        tracked(&value, detail, |path| {
            if value_at(&value, &path).is_some_and(|v| !v.is_null()) {
                note(&path)
            }
        })
    } else {
        // The strings move into the typed object.
        tracked(value, detail, |path| note(&path))
    };
    let obj: T = match result {
        Ok(obj) => obj,
        Err(None) => return Err(Inexact),
        Err(Some(e)) => {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            out.rejections.push(rejection(
                kind,
                &key.namespace,
                &key.name,
                &field,
                REASON_PARSE_ERROR,
                e.into_inner().to_string(),
                origin,
            ));
            return Ok(None);
        }
    };
    if unknown.is_empty() {
        return Ok(Some(obj));
    }
    for field in unknown {
        let last = field
            .rsplit(['.', ']'])
            .next()
            .unwrap_or(&field)
            .to_string();
        out.rejections.push(rejection(
            kind,
            &key.namespace,
            &key.name,
            &field,
            REASON_UNKNOWN_FIELD,
            format!("unknown field {last:?}: not a field of {kind} at this place (check the spelling; kproxy validates strictly, like kubectl apply)"),
            origin,
        ));
    }
    Ok(None)
}

/// Deserializes `de` into `T`, calling `on_ignored` with each value the type
/// skipped. An error names its field in `Detail::Exact`; in `Detail::Fast`
/// it is `None`.
fn tracked<'de, D, T>(
    de: D,
    detail: Detail,
    mut on_ignored: impl FnMut(serde_ignored::Path<'_>),
) -> Result<T, Option<serde_path_to_error::Error<D::Error>>>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let de = serde_ignored::Deserializer::new(de, &mut on_ignored);
    match detail {
        Detail::Fast => T::deserialize(de).map_err(|_| None),
        Detail::Exact => serde_path_to_error::deserialize(de).map_err(Some),
    }
}

/// Whether a null appears anywhere in `value`.
fn has_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.iter().any(has_null),
        Value::Object(o) => o.values().any(has_null),
        _ => false,
    }
}

/// Writes `path` as `spec.ports[0].prot`.
fn field_path(path: &serde_ignored::Path<'_>, out: &mut String) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            field_path(parent, out);
            out.push_str(&format!("[{index}]"));
        }
        Path::Map { parent, key } => {
            field_path(parent, out);
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent, out),
    }
}

/// The value of the document at `path`.
fn value_at<'v>(value: &'v Value, path: &serde_ignored::Path<'_>) -> Option<&'v Value> {
    use serde_ignored::Path;
    match path {
        Path::Root => Some(value),
        Path::Seq { parent, index } => value_at(value, parent)?.get(index),
        Path::Map { parent, key } => value_at(value, parent)?.get(key.as_str()),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => value_at(value, parent),
    }
}

/// `metadata.namespace` and `metadata.name` as far as they are strings.
fn meta_names(map: &Map<String, Value>) -> (String, String) {
    let meta = map.get("metadata");
    let get = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (get("namespace"), get("name"))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

pub(crate) fn rejection(
    kind: &str,
    namespace: &str,
    name: &str,
    field: &str,
    reason: &str,
    message: String,
    origin: &str,
) -> Rejection {
    Rejection {
        kind: kind.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        field: field.to_string(),
        reason: reason.to_string(),
        message,
        origin: Some(origin.to_string()),
    }
}
