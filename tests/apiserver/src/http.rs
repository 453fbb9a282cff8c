//! The HTTP side: Kubernetes REST paths over the [`Store`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};

use crate::resources::{self, Resource};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{ApiError, ApiResult, EventType, Filter, PatchType, Store};

/// Shared by every request.
pub struct Shared {
    pub store: Arc<Store>,
    /// Bumped to end every open watch.
    pub drop_watches: watch::Sender<u64>,
    /// Set by `stop()` before anything else: checked synchronously so that no
    /// request or watch event racing a stop reaches a client (aborting the
    /// connection tasks alone takes effect only at their next poll).
    pub stopped: AtomicBool,
    pub bookmark_interval: Duration,
    pub server_addr: String,
    pub requests: AtomicU64,
    /// Watches refused with 410 Gone (resourceVersion too old).
    pub expired: AtomicU64,
    /// Hook for `pods/{name}/portforward` (set by the port-forward module).
    pub port_forward: Option<PortForwardHook>,
    /// Port-forward faults (cut streams, idle timeout).
    pub port_forward_faults: Arc<crate::portforward::Faults>,
    /// RBAC: denied resources, a role, the 1.35 WebSocket `create` check.
    pub authz: std::sync::Mutex<crate::authz::Authz>,
    /// Starts ephemeral containers (the kubelet's part).
    pub ephemeral: Option<crate::ephemeral::EphemeralHook>,
}

pub type PortForwardHook = Arc<
    dyn Fn(
            Arc<Value>,
            Request,
            Arc<crate::portforward::Faults>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>
        + Send
        + Sync,
>;

/// The 403 an RBAC denial of `verb` gets.
fn forbidden(target: &Target, verb: &str) -> Response {
    let resource = match &target.sub {
        Some(sub) => format!("{}/{sub}", target.res.plural),
        None => target.res.plural.to_string(),
    };
    let name = target
        .name
        .as_deref()
        .map(|n| format!(" \"{n}\""))
        .unwrap_or_default();
    let ns = target
        .ns
        .as_deref()
        .map(|n| format!(" in the namespace \"{n}\""))
        .unwrap_or_default();
    error(&ApiError::new(
        403,
        "Forbidden",
        format!(
            "{}{name} is forbidden: User \"kproxy-test\" cannot {verb} resource \"{resource}\" in API group \"{}\"{ns}",
            target.res.plural, target.res.group
        ),
    ))
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

fn error(e: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.status(),
    )
}

fn not_found_path(path: &str) -> Response {
    error(&ApiError::new(
        404,
        "NotFound",
        format!("the server could not find the requested resource ({path})"),
    ))
}

/// Where a request goes after the group/version prefix.
struct Target {
    res: &'static Resource,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn route(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let find = |p: &str| resources::find(group, version, p);
    let t = |res, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Some(Target {
            res,
            ns: ns.map(str::to_string),
            name: name.map(str::to_string),
            sub: sub.map(str::to_string),
        })
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|r| r.namespaced) => {
            let res = find(plural)?;
            match tail {
                [] => t(res, Some(ns), None, None),
                [name] => t(res, Some(ns), Some(name), None),
                [name, sub] => t(res, Some(ns), Some(name), Some(sub)),
                _ => None,
            }
        }
        [plural] => t(find(plural)?, None, None, None),
        [plural, name] => t(find(plural)?, None, Some(name), None),
        [plural, name, sub] => t(find(plural)?, None, Some(name), Some(sub)),
        _ => None,
    }
}

/// A stopped server answers nothing: whatever a request read may postdate the stop.
fn stopping() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the test API server is stopped",
    )
        .into_response()
}

pub async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    if shared.stopped.load(Ordering::SeqCst) {
        return stopping();
    }
    let resp = serve_request(&shared, req).await;
    // Checked again after the store was read: a read that passes this check
    // happened before the stop, so it cannot carry a change made after it.
    if shared.stopped.load(Ordering::SeqCst) {
        return stopping();
    }
    resp
}

async fn serve_request(shared: &Arc<Shared>, req: Request) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> =
        req.uri().query().map(url_decode_pairs).unwrap_or_default();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    tracing::debug!(%method, uri = %req.uri(), "request");
    match segs.as_slice() {
        ["version"] => return ok(&resources::version_doc()),
        ["healthz"] | ["readyz"] | ["livez"] => return (StatusCode::OK, "ok").into_response(),
        ["api"] => return ok(&resources::api_versions(&shared.server_addr)),
        ["openapi", "v3"] => return ok(&resources::openapi_v3_index()),
        ["openapi", "v3", rest @ ..] => {
            return resources::openapi_v3_group(&rest.join("/"))
                .map(|d| ok(&d))
                .unwrap_or_else(|| not_found_path(&path))
        }
        ["apis"] => return ok(&resources::api_group_list()),
        ["api", v] => {
            return resources::resource_list("", v)
                .map(|d| ok(&d))
                .unwrap_or_else(|| not_found_path(&path))
        }
        ["apis", g] => {
            return resources::api_group(g)
                .map(|d| ok(&d))
                .unwrap_or_else(|| not_found_path(&path))
        }
        ["apis", g, v] => {
            return resources::resource_list(g, v)
                .map(|d| ok(&d))
                .unwrap_or_else(|| not_found_path(&path))
        }
        _ => {}
    }
    let target = match segs.as_slice() {
        ["api", v, rest @ ..] => route("", v, rest),
        ["apis", g, v, rest @ ..] => route(g, v, rest),
        _ => None,
    };
    let Some(target) = target else {
        return not_found_path(&path);
    };
    let refused = {
        let authz = shared.authz.lock().unwrap_or_else(|e| e.into_inner());
        let key = match &target.sub {
            Some(sub) => format!("{}/{sub}", target.res.plural),
            None => target.res.plural.to_string(),
        };
        let kind = crate::authz::RequestKind {
            method: method.clone(),
            named: target.name.is_some(),
            watch: truthy(&query, "watch"),
            websocket: req
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
            streaming: matches!(
                target.sub.as_deref(),
                Some("portforward" | "exec" | "attach")
            ),
        };
        authz.refused(&key, &authz.verbs(&kind))
    };
    if let Some(verb) = refused {
        return forbidden(&target, verb);
    }
    if target.sub.as_deref() == Some("portforward") {
        let Some(hook) = shared.port_forward.clone() else {
            return not_found_path(&path);
        };
        let name = target.name.clone().unwrap_or_default();
        return match shared.store.get(target.res, target.ns.as_deref(), &name) {
            Ok(pod) => hook(pod, req, shared.port_forward_faults.clone()).await,
            Err(e) => error(&e),
        };
    }
    if let Some(sub) = &target.sub {
        if !target.res.subresources.contains(&sub.as_str()) {
            return not_found_path(&path);
        }
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let body = match axum::body::to_bytes(req.into_body(), 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    match serve(shared, method, target, &query, &content_type, body).await {
        Ok(resp) => resp,
        Err(e) => error(&e),
    }
}

/// After a write of `pods/{name}/ephemeralcontainers`: the kubelet starts
/// the containers it added.
fn kubelet_starts(
    shared: &Shared,
    sub: Option<&str>,
    dry_run: bool,
    before: &Value,
    after: &Arc<Value>,
) {
    if sub != Some("ephemeralcontainers") || dry_run {
        return;
    }
    let added = crate::ephemeral::added(before, after);
    crate::ephemeral::start(
        shared.store.clone(),
        shared.ephemeral.clone(),
        after.clone(),
        added,
    );
}

/// `a=b&c=d` with percent- and plus-decoding.
fn url_decode_pairs(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_body(content_type: &str, body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    if content_type.contains("yaml") {
        return serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn filter_of(target: &Target, query: &HashMap<String, String>) -> ApiResult<Filter> {
    Ok(Filter {
        namespace: target.ns.clone(),
        labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
    })
}

fn truthy(query: &HashMap<String, String>, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

async fn serve(
    shared: &Arc<Shared>,
    method: Method,
    target: Target,
    query: &HashMap<String, String>,
    content_type: &str,
    body: Bytes,
) -> ApiResult<Response> {
    let store = &shared.store;
    let res = target.res;
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let ns = target.ns.as_deref();
    let sub = target.sub.as_deref();
    match (&method, target.name.as_deref()) {
        (&Method::GET, None) if truthy(query, "watch") => {
            watch_response(shared, &target, query).map(IntoResponse::into_response)
        }
        (&Method::GET, None) => {
            let filter = filter_of(&target, query)?;
            let (rv, items) = store.list(res, &filter);
            let items: Vec<&Value> = items.iter().map(|a| a.as_ref()).collect();
            Ok(ok(&json!({
                "kind": format!("{}List", res.kind),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            })))
        }
        (&Method::GET, Some(name)) => {
            let obj = store.get(res, ns, name)?;
            Ok(match sub {
                Some("scale") => ok(&crate::store::scale_of(res, &obj)),
                _ => ok(&obj),
            })
        }
        (&Method::POST, None) => {
            let obj = parse_body(content_type, &body)?;
            let created = store.create(res, ns, obj, dry_run)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (&Method::PUT, Some(name)) => {
            let mut obj = parse_body(content_type, &body)?;
            if sub == Some("scale") {
                let mut cur = (*store.get(res, ns, name)?).clone();
                cur["spec"]["replicas"] = obj["spec"]["replicas"].clone();
                obj = cur;
                obj["metadata"]
                    .as_object_mut()
                    .map(|m| m.remove("resourceVersion"));
                let updated = store.update(res, ns, name, obj, None, dry_run)?;
                return Ok(ok(&crate::store::scale_of(res, &updated)));
            }
            let before = store.get(res, ns, name)?;
            let updated = store.update(res, ns, name, obj, sub, dry_run)?;
            kubelet_starts(shared, sub, dry_run, &before, &updated);
            Ok(ok(&updated))
        }
        (&Method::PATCH, Some(name)) => {
            let kind = PatchType::from_content_type(content_type).ok_or_else(|| {
                ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format ({content_type})"),
                )
            })?;
            let patch = parse_body(content_type, &body)?;
            let before = store.get(res, ns, name).ok();
            let patched = store.patch(res, ns, name, kind, &patch, sub, dry_run)?;
            if let Some(before) = before {
                kubelet_starts(shared, sub, dry_run, &before, &patched);
            }
            Ok(match sub {
                Some("scale") => ok(&crate::store::scale_of(res, &patched)),
                _ => ok(&patched),
            })
        }
        (&Method::DELETE, Some(name)) => {
            let gone = store.delete(res, ns, name, dry_run)?;
            Ok(ok(&gone))
        }
        (&Method::DELETE, None) => {
            let filter = filter_of(&target, query)?;
            let (_, items) = store.list(res, &filter);
            let mut deleted = Vec::new();
            for item in items {
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                let ns = item["metadata"]["namespace"].as_str();
                if let Ok(gone) = store.delete(res, ns, name, dry_run) {
                    deleted.push(gone);
                }
            }
            let items: Vec<&Value> = deleted.iter().map(|a| a.as_ref()).collect();
            Ok(ok(&json!({
                "kind": format!("{}List", res.kind),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": store.resource_version().to_string()},
                "items": items,
            })))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )),
    }
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn watch_response(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
) -> ApiResult<Response> {
    let res = target.res;
    let filter = filter_of(target, query)?;
    let rv = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))?,
        ),
    };
    let bookmarks = truthy(query, "allowWatchBookmarks");
    let send_initial = truthy(query, "sendInitialEvents");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1024);
    let start = match shared
        .store
        .watch(res, &filter, if send_initial { None } else { rv })
    {
        Ok(start) => start,
        Err(e) if e.code == 410 => {
            shared.expired.fetch_add(1, Ordering::Relaxed);
            // As the real server: 200, then an ERROR event carrying the 410.
            let line = event_line("ERROR", &e.status());
            return Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(line))
                .unwrap_or_default());
        }
        Err(e) => return Err(e),
    };
    let mut stop = shared.drop_watches.subscribe();
    let shared = shared.clone();
    let interval = shared.bookmark_interval;
    let api_version = res.api_version();
    let kind = res.kind;
    tokio::spawn(async move {
        let bookmark = |rv: u64, initial_end: bool| {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            event_line(
                "BOOKMARK",
                &json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
            )
        };
        let mut last_rv = start.rv;
        for (ty, obj) in start.backlog {
            if tx.send(Ok(event_line(ty.as_str(), &obj))).await.is_err() {
                return;
            }
        }
        if send_initial && bookmarks && tx.send(Ok(bookmark(last_rv, true))).await.is_err() {
            return;
        }
        let mut events = start.rx;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= start.rv || !std::ptr::eq(ev.resource, res) {
                            continue;
                        }
                        // A stop (or drop) that came first wins over an event that raced it:
                        // nothing changed after `stop()` may reach a client.
                        if stop.has_changed().unwrap_or(true) || shared.stopped.load(Ordering::SeqCst) {
                            return;
                        }
                        last_rv = ev.rv;
                        if let Some((ty, obj)) = filter.view(&ev) {
                            let ty = if ty == EventType::Deleted { "DELETED" } else { ty.as_str() };
                            if tx.send(Ok(event_line(ty, &obj))).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Too slow a reader: end the watch; the client resumes from its last resourceVersion.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick() => {
                    // Without bookmarks this still notices a client that went away.
                    if tx.is_closed() || (bookmarks && tx.send(Ok(bookmark(last_rv, false))).await.is_err()) {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = stop.changed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let t = route("", "v1", &["namespaces", "default", "services", "x"]).unwrap();
        assert_eq!(t.res.plural, "services");
        assert_eq!(t.ns.as_deref(), Some("default"));
        assert_eq!(t.name.as_deref(), Some("x"));
        let t = route("", "v1", &["namespaces", "default"]).unwrap();
        assert_eq!(t.res.plural, "namespaces");
        assert_eq!(t.name.as_deref(), Some("default"));
        let t = route("", "v1", &["nodes"]).unwrap();
        assert!(t.name.is_none());
        let t = route("discovery.k8s.io", "v1", &["endpointslices"]).unwrap();
        assert!(t.ns.is_none());
        assert!(route("", "v1", &["nope"]).is_none());
    }

    #[test]
    fn decodes_queries() {
        let q = url_decode_pairs("labelSelector=kubernetes.io%2Fservice-name&watch=true&x=a+b");
        assert_eq!(q["labelSelector"], "kubernetes.io/service-name");
        assert_eq!(q["x"], "a b");
    }
}
