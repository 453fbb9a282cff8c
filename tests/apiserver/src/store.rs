//! The object store: every object as JSON, one global resourceVersion counter
//! (as etcd has), an event history that can be compacted, and a broadcast of
//! events to watches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::patch;
use crate::resources::Resource;
use crate::selector::{FieldSelector, LabelSelector};

/// An API error, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn not_found(res: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.qualified()),
        )
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn invalid(res: &Resource, name: &str, message: impl Into<String>) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {}", res.kind, message.into()),
        )
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change in the history.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub resource: &'static Resource,
    pub kind: EventType,
    pub object: Arc<Value>,
    /// The object before the change (for selector transitions).
    pub prev: Option<Arc<Value>>,
}

/// Which objects a list or watch covers.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns) {
                return false;
            }
        }
        self.labels.matches_object(obj) && self.fields.matches_object(obj)
    }

    /// What a watcher with this filter sees of `ev` (selector transitions
    /// become ADDED / DELETED, as the real API server does).
    pub fn view(&self, ev: &Event) -> Option<(EventType, Arc<Value>)> {
        let now = self.matches(&ev.object);
        let before = ev.prev.as_ref().is_some_and(|p| self.matches(p));
        match (ev.kind, before, now) {
            (EventType::Deleted, _, true) => Some((EventType::Deleted, ev.object.clone())),
            (EventType::Added, _, true) => Some((EventType::Added, ev.object.clone())),
            (EventType::Modified, true, true) => Some((EventType::Modified, ev.object.clone())),
            (EventType::Modified, false, true) => Some((EventType::Added, ev.object.clone())),
            (EventType::Modified, true, false) => Some((EventType::Deleted, ev.object.clone())),
            _ => None,
        }
    }
}

type Key = (String, String);

struct Inner {
    rv: u64,
    objects: HashMap<(&'static str, &'static str, &'static str), BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Arc<Event>>,
    /// Events with rv <= compacted are gone: watching from before it is 410.
    compacted: u64,
    history_cap: usize,
    next_uid: u64,
    next_cluster_ip: u32,
    next_node_port: u16,
}

/// Where a watch starts.
pub struct WatchStart {
    /// Events to send first (initial ADDED events or history replay).
    pub backlog: Vec<(EventType, Arc<Value>)>,
    pub rv: u64,
    pub rx: broadcast::Receiver<Arc<Event>>,
}

pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
}

fn rkey(r: &'static Resource) -> (&'static str, &'static str, &'static str) {
    (r.group, r.version, r.plural)
}

pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// How a write is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Strategic,
    Json,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let ct = ct.split(';').next().unwrap_or("").trim();
        match ct {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(1 << 16);
        let store = Store {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: HashMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                history_cap: 200_000,
                next_uid: 1,
                next_cluster_ip: 10,
                next_node_port: 30000,
            }),
            events,
        };
        let ns = crate::resources::find("", "v1", "namespaces").expect("namespaces is served");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
            store
                .create(ns, None, obj, false)
                .expect("creating built-in namespaces");
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets the history: any watch or list from an older resourceVersion
    /// gets 410 Gone, as after an etcd compaction.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.compacted = inner.rv;
        inner.history.clear();
    }

    /// Limits the history kept (oldest events are compacted beyond it).
    pub fn set_history_cap(&self, cap: usize) {
        self.lock().history_cap = cap.max(1);
    }

    fn record(&self, inner: &mut Inner, ev: Event) {
        let ev = Arc::new(ev);
        inner.history.push_back(ev.clone());
        while inner.history.len() > inner.history_cap {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rv;
            }
        }
        // No receivers is fine.
        let _ = self.events.send(ev);
    }

    pub fn get(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<Arc<Value>> {
        let inner = self.lock();
        inner
            .objects
            .get(&rkey(res))
            .and_then(|m| m.get(&(ns.unwrap_or("").to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    pub fn list(&self, res: &'static Resource, filter: &Filter) -> (u64, Vec<Arc<Value>>) {
        let inner = self.lock();
        let items = inner
            .objects
            .get(&rkey(res))
            .map(|m| m.values().filter(|o| filter.matches(o)).cloned().collect())
            .unwrap_or_default();
        (inner.rv, items)
    }

    /// Starts a watch. `rv`: None or 0 sends every current object as ADDED
    /// first; otherwise replays the history after `rv` (410 if compacted).
    pub fn watch(
        &self,
        res: &'static Resource,
        filter: &Filter,
        rv: Option<u64>,
    ) -> ApiResult<WatchStart> {
        let inner = self.lock();
        // Subscribe under the lock: no event can slip between backlog and stream.
        let rx = self.events.subscribe();
        let backlog = match rv {
            None | Some(0) => inner
                .objects
                .get(&rkey(res))
                .map(|m| {
                    m.values()
                        .filter(|o| filter.matches(o))
                        .map(|o| (EventType::Added, o.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            Some(from) => {
                if from < inner.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {from} ({})",
                        inner.compacted
                    )));
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.rv > from && std::ptr::eq(e.resource, res))
                    .filter_map(|e| filter.view(e))
                    .collect()
            }
        };
        Ok(WatchStart {
            backlog,
            rv: inner.rv,
            rx,
        })
    }

    pub fn create(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> ApiResult<Arc<Value>> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let mut inner = self.lock();
        let ns = self.namespace_for(res, ns, &obj)?;
        let name = match meta_str(&obj, "name") {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match meta_str(&obj, "generateName") {
                Some(prefix) => format!("{prefix}{:05x}", inner.next_uid & 0xfffff),
                None => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ))
                }
            },
        };
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                res,
                &name,
                "metadata.name: Invalid value: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
            ));
        }
        let key = (ns.clone(), name.clone());
        if inner
            .objects
            .get(&rkey(res))
            .is_some_and(|m| m.contains_key(&key))
        {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", res.qualified()),
            ));
        }
        let rv = inner.rv + 1;
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind);
        let uid = format!("00000000-0000-4000-8000-{:012x}", inner.next_uid);
        inner.next_uid += 1;
        {
            let meta = obj
                .as_object_mut()
                .expect("checked above")
                .entry("metadata")
                .or_insert_with(|| json!({}));
            meta["name"] = json!(name);
            if res.namespaced {
                meta["namespace"] = json!(ns);
            }
            meta["uid"] = json!(uid);
            meta["resourceVersion"] = json!(rv.to_string());
            meta["creationTimestamp"] = json!(now_rfc3339());
            if res.has_spec {
                meta["generation"] = json!(1);
            }
            if let Some(m) = meta.as_object_mut() {
                m.remove("managedFields");
                m.remove("deletionTimestamp");
            }
        }
        default_object(res, &mut obj, &mut inner)?;
        let obj = Arc::new(obj);
        if dry_run {
            return Ok(obj);
        }
        inner.rv = rv;
        inner
            .objects
            .entry(rkey(res))
            .or_default()
            .insert(key, obj.clone());
        self.record(
            &mut inner,
            Event {
                rv,
                resource: res,
                kind: EventType::Added,
                object: obj.clone(),
                prev: None,
            },
        );
        Ok(obj)
    }

    fn namespace_for(
        &self,
        res: &Resource,
        path_ns: Option<&str>,
        obj: &Value,
    ) -> ApiResult<String> {
        if !res.namespaced {
            return Ok(String::new());
        }
        let obj_ns = meta_str(obj, "namespace").filter(|n| !n.is_empty());
        match (path_ns, obj_ns) {
            (Some(p), Some(o)) if p != o => Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            )),
            (Some(p), _) => Ok(p.to_string()),
            (None, Some(o)) => Ok(o.to_string()),
            (None, None) => Ok("default".to_string()),
        }
    }

    /// PUT: replaces the object. A resourceVersion in the body must match.
    pub fn update(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        obj: Value,
        subresource: Option<&str>,
        dry_run: bool,
    ) -> ApiResult<Arc<Value>> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if let Some(body_name) = meta_str(&obj, "name") {
            if body_name != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
        }
        let ns = self.namespace_for(res, ns, &obj)?;
        let mut inner = self.lock();
        let key = (ns, name.to_string());
        let old = inner
            .objects
            .get(&rkey(res))
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))?;
        if let Some(want) = meta_str(&obj, "resourceVersion").filter(|s| !s.is_empty()) {
            if Some(want) != meta_str(&old, "resourceVersion") {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        res.qualified()
                    ),
                ));
            }
        }
        let new = match subresource {
            Some("ephemeralcontainers") => crate::ephemeral::merge(&old, &obj)?,
            _ => merge_for_update(res, &old, obj, subresource),
        };
        self.commit_update(&mut inner, res, key, old, new, dry_run)
    }

    fn commit_update(
        &self,
        inner: &mut Inner,
        res: &'static Resource,
        key: Key,
        old: Arc<Value>,
        mut new: Value,
        dry_run: bool,
    ) -> ApiResult<Arc<Value>> {
        // Identity and server-owned fields come from the stored object.
        new["apiVersion"] = json!(res.api_version());
        new["kind"] = json!(res.kind);
        let rv = inner.rv + 1;
        {
            let meta = new
                .as_object_mut()
                .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?
                .entry("metadata")
                .or_insert_with(|| json!({}));
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
            ] {
                match old["metadata"].get(field) {
                    Some(v) => meta[field] = v.clone(),
                    None => {
                        if let Some(m) = meta.as_object_mut() {
                            m.remove(field);
                        }
                    }
                }
            }
            if let Some(m) = meta.as_object_mut() {
                m.remove("managedFields");
            }
        }
        if res.has_spec && old.get("spec") != new.get("spec") {
            let gen = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(gen);
        }
        default_object(res, &mut new, inner)?;
        // A write that changes nothing is a no-op, as in the real server.
        let mut unchanged = new.clone();
        unchanged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if unchanged == *old {
            return Ok(old);
        }
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        let new = Arc::new(new);
        if dry_run {
            return Ok(new);
        }
        inner.rv = rv;
        inner
            .objects
            .entry(rkey(res))
            .or_default()
            .insert(key, new.clone());
        self.record(
            inner,
            Event {
                rv,
                resource: res,
                kind: EventType::Modified,
                object: new.clone(),
                prev: Some(old),
            },
        );
        Ok(new)
    }

    /// PATCH. A server-side apply of a missing object creates it.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        body: &Value,
        subresource: Option<&str>,
        dry_run: bool,
    ) -> ApiResult<Arc<Value>> {
        let key = (
            if res.namespaced {
                ns.unwrap_or("default").to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
        let mut inner = self.lock();
        let old = inner
            .objects
            .get(&rkey(res))
            .and_then(|m| m.get(&key))
            .cloned();
        let Some(old) = old else {
            drop(inner);
            if kind == PatchType::Apply && subresource.is_none() {
                let mut obj = body.clone();
                obj["metadata"]["name"] = json!(name);
                return self.create(res, ns, obj, dry_run);
            }
            return Err(ApiError::not_found(res, name));
        };
        let mut target: Value = match subresource {
            Some("scale") => scale_of(res, &old),
            _ => (*old).clone(),
        };
        match kind {
            PatchType::Merge => patch::merge_patch(&mut target, body),
            PatchType::Strategic | PatchType::Apply => {
                patch::strategic_merge_patch(&mut target, body)
            }
            PatchType::Json => patch::json_patch(&mut target, body)
                .map_err(|e| ApiError::new(422, "Invalid", e))?,
        }
        if let Some(want) = meta_str(&target, "resourceVersion") {
            if kind != PatchType::Json
                && body.pointer("/metadata/resourceVersion").is_some()
                && Some(want) != meta_str(&old, "resourceVersion")
            {
                return Err(ApiError::new(409, "Conflict", format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified", res.qualified())));
            }
        }
        let new = match subresource {
            Some("scale") => {
                let mut new = (*old).clone();
                new["spec"]["replicas"] = target["spec"]["replicas"].clone();
                new
            }
            Some("ephemeralcontainers") => crate::ephemeral::merge(&old, &target)?,
            _ => merge_for_update(res, &old, target, subresource),
        };
        self.commit_update(&mut inner, res, key, old, new, dry_run)
    }

    pub fn delete(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        dry_run: bool,
    ) -> ApiResult<Arc<Value>> {
        let key = (
            if res.namespaced {
                ns.unwrap_or("default").to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
        let mut inner = self.lock();
        let exists = inner
            .objects
            .get(&rkey(res))
            .is_some_and(|m| m.contains_key(&key));
        if !exists {
            return Err(ApiError::not_found(res, name));
        }
        if dry_run {
            return Ok(inner.objects[&rkey(res)][&key].clone());
        }
        let old = inner
            .objects
            .get_mut(&rkey(res))
            .and_then(|m| m.remove(&key))
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let rv = inner.rv + 1;
        inner.rv = rv;
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        let gone = Arc::new(gone);
        self.record(
            &mut inner,
            Event {
                rv,
                resource: res,
                kind: EventType::Deleted,
                object: gone.clone(),
                prev: Some(old),
            },
        );
        Ok(gone)
    }

    /// Creates the object or replaces it (whatever resourceVersion it has).
    pub fn put(&self, res: &'static Resource, obj: Value) -> ApiResult<Arc<Value>> {
        let ns = meta_str(&obj, "namespace").map(str::to_string);
        let name = meta_str(&obj, "name")
            .ok_or_else(|| ApiError::bad_request("object without metadata.name"))?
            .to_string();
        let mut obj = obj;
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        match self.update(res, ns.as_deref(), &name, obj.clone(), Some("all"), false) {
            Err(e) if e.code == 404 => self.create(res, ns.as_deref(), obj, false),
            other => other,
        }
    }
}

/// The stored object after an update of `sub` (None: the main resource,
/// which keeps the old status; "status": only the status changes; "all":
/// everything, for the test handle).
fn merge_for_update(res: &Resource, old: &Value, mut new: Value, sub: Option<&str>) -> Value {
    match sub {
        Some("status") => {
            let mut out = old.clone();
            out["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            if let Some(meta) = new.get("metadata") {
                out["metadata"]["resourceVersion"] = meta["resourceVersion"].clone();
            }
            out
        }
        None if res.subresources.contains(&"status") => {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            new
        }
        _ => new,
    }
}

/// The autoscaling/v1 Scale of a workload.
pub fn scale_of(res: &Resource, obj: &Value) -> Value {
    let labels = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let _ = res;
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "uid": obj["metadata"]["uid"],
            "resourceVersion": obj["metadata"]["resourceVersion"],
            "creationTimestamp": obj["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": labels,
        }
    })
}

/// Defaulting the real API server does for the types kproxy reads.
fn default_object(res: &Resource, obj: &mut Value, inner: &mut Inner) -> ApiResult<()> {
    if res.kind != "Service" || !res.group.is_empty() {
        return Ok(());
    }
    let name = meta_str(obj, "name").unwrap_or("").to_string();
    let spec = obj
        .as_object_mut()
        .expect("objects are JSON objects")
        .entry("spec")
        .or_insert_with(|| json!({}));
    if spec.get("type").is_none() {
        spec["type"] = json!("ClusterIP");
    }
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if ty == "ExternalName" {
        return Ok(());
    }
    if spec.get("sessionAffinity").is_none() {
        spec["sessionAffinity"] = json!("None");
    }
    if spec.get("internalTrafficPolicy").is_none() {
        spec["internalTrafficPolicy"] = json!("Cluster");
    }
    if spec.get("clusterIP").is_none_or(|v| v.as_str() == Some("")) {
        let n = inner.next_cluster_ip;
        inner.next_cluster_ip += 1;
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n);
        spec["clusterIP"] = json!(ip.to_string());
    }
    if spec.get("clusterIPs").is_none() {
        spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
    }
    if spec["clusterIP"] != "None" {
        if spec.get("ipFamilies").is_none() {
            spec["ipFamilies"] = json!(["IPv4"]);
        }
        if spec.get("ipFamilyPolicy").is_none() {
            spec["ipFamilyPolicy"] = json!("SingleStack");
        }
    }
    let needs_node_port = ty == "NodePort" || ty == "LoadBalancer";
    if needs_node_port && spec.get("externalTrafficPolicy").is_none() {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            if !p.is_object() {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "Service \"{name}\" is invalid: spec.ports: each port must be an object"
                    ),
                ));
            }
            if p.get("protocol").is_none() {
                p["protocol"] = json!("TCP");
            }
            if p.get("targetPort").is_none() {
                p["targetPort"] = p["port"].clone();
            }
            if needs_node_port && p.get("nodePort").is_none() {
                p["nodePort"] = json!(inner.next_node_port);
                inner.next_node_port = inner.next_node_port.wrapping_add(1).max(30000);
            }
        }
    }
    Ok(())
}
