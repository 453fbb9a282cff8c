//! `pods/{name}/ephemeralcontainers` as the API server and the kubelet
//! handle it: the subresource only adds containers to
//! `spec.ephemeralContainers` (an existing one may not be changed or
//! removed, 422), and the kubelet then starts each new one and reports it
//! in `status.ephemeralContainerStatuses`. Starting is the test's to do (a
//! hook: a test runs the container's command where the pod lives); without
//! a hook, new containers stay waiting as if their image never arrived.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::store::{ApiError, ApiResult, Store};

/// Starts one ephemeral container (the pod, the container's spec): Ok once
/// it runs, Err with a reason and message (`ErrImagePull`, "...") when it
/// cannot.
pub type EphemeralHook = Arc<
    dyn Fn(Arc<Value>, Value) -> Pin<Box<dyn Future<Output = Result<(), (String, String)>> + Send>>
        + Send
        + Sync,
>;

fn containers(pod: &Value) -> &[Value] {
    pod.pointer("/spec/ephemeralContainers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn name_of(c: &Value) -> &str {
    c.get("name").and_then(Value::as_str).unwrap_or_default()
}

/// The pod after an update of the subresource: only the ephemeral
/// containers are taken from `new`, and the existing ones must stay as
/// they were.
pub fn merge(old: &Value, new: &Value) -> ApiResult<Value> {
    let invalid = |msg: String| {
        let name = old
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        ApiError::new(422, "Invalid", format!("Pod \"{name}\" is invalid: {msg}"))
    };
    let wanted = containers(new);
    for c in containers(old) {
        match wanted.iter().find(|w| name_of(w) == name_of(c)) {
            None => {
                return Err(invalid(format!(
                    "spec.ephemeralContainers: Forbidden: existing ephemeral containers \"{}\" may not be removed",
                    name_of(c)
                )))
            }
            Some(w) if w != c => {
                return Err(invalid(format!(
                    "spec.ephemeralContainers: Forbidden: existing ephemeral containers \"{}\" may not be changed",
                    name_of(c)
                )))
            }
            Some(_) => {}
        }
    }
    for (i, c) in wanted.iter().enumerate() {
        if name_of(c).is_empty() {
            return Err(invalid(format!(
                "spec.ephemeralContainers[{i}].name: Required value"
            )));
        }
        if c.get("image")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            return Err(invalid(format!(
                "spec.ephemeralContainers[{i}].image: Required value"
            )));
        }
        if wanted[..i].iter().any(|o| name_of(o) == name_of(c)) {
            return Err(invalid(format!(
                "spec.ephemeralContainers[{i}].name: Duplicate value: \"{}\"",
                name_of(c)
            )));
        }
    }
    let mut out = old.clone();
    out["spec"]["ephemeralContainers"] = json!(wanted);
    if let Some(rv) = new.pointer("/metadata/resourceVersion") {
        out["metadata"]["resourceVersion"] = rv.clone();
    }
    Ok(out)
}

/// The containers `new` has that `old` had not.
pub fn added(old: &Value, new: &Value) -> Vec<Value> {
    containers(new)
        .iter()
        .filter(|c| !containers(old).iter().any(|o| name_of(o) == name_of(c)))
        .cloned()
        .collect()
}

/// Plays the kubelet for containers just added to `pod`: reports each
/// waiting, then runs it through `hook` and reports it running (or
/// waiting with the hook's reason).
pub fn start(store: Arc<Store>, hook: Option<EphemeralHook>, pod: Arc<Value>, new: Vec<Value>) {
    for c in new {
        let name = name_of(&c).to_string();
        let image = c.get("image").cloned().unwrap_or(Value::Null);
        set_state(
            &store,
            &pod,
            &name,
            &image,
            json!({"waiting": {"reason": "ContainerCreating"}}),
        );
        let Some(hook) = hook.clone() else { continue };
        let (store, pod) = (store.clone(), pod.clone());
        tokio::spawn(async move {
            let state = match hook(pod.clone(), c).await {
                Ok(()) => json!({"running": {"startedAt": crate::store::now_rfc3339()}}),
                Err((reason, message)) => {
                    json!({"waiting": {"reason": reason, "message": message}})
                }
            };
            set_state(&store, &pod, &name, &image, state);
        });
    }
}

/// Writes one container's state into the pod's status (replacing its
/// earlier entry), as the kubelet's status update does.
fn set_state(store: &Store, pod: &Value, name: &str, image: &Value, state: Value) {
    let res = crate::resources::find("", "v1", "pods").expect("pods is a resource");
    let ns = pod.pointer("/metadata/namespace").and_then(Value::as_str);
    let Some(pod_name) = pod.pointer("/metadata/name").and_then(Value::as_str) else {
        return;
    };
    let Ok(cur) = store.get(res, ns, pod_name) else {
        return;
    };
    let mut cur = (*cur).clone();
    let running = state.get("running").is_some();
    let entry = json!({"name": name, "image": image, "imageID": "", "ready": false,
        "restartCount": 0, "started": running, "state": state});
    let statuses = cur["status"]["ephemeralContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut statuses: Vec<Value> = statuses
        .into_iter()
        .filter(|s| name_of(s) != name)
        .collect();
    statuses.push(entry);
    cur["status"]["ephemeralContainerStatuses"] = json!(statuses);
    if let Err(e) = store.update(res, ns, pod_name, cur, Some("status"), false) {
        tracing::debug!("ephemeral container {name} status: {e:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(eph: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "default", "resourceVersion": "5"},
            "spec": {"containers": [{"name": "c", "image": "x"}], "ephemeralContainers": eph}})
    }

    #[test]
    fn adds_containers_and_keeps_existing_ones_unchanged() {
        let old = pod(json!([{"name": "a", "image": "i"}]));
        let new = pod(json!([{"name": "a", "image": "i"}, {"name": "b", "image": "j"}]));
        let merged = merge(&old, &new).unwrap();
        assert_eq!(containers(&merged).len(), 2);
        assert_eq!(
            added(&old, &merged),
            vec![json!({"name": "b", "image": "j"})]
        );

        let changed = pod(json!([{"name": "a", "image": "other"}]));
        let e = merge(&old, &changed).unwrap_err();
        assert!(format!("{e:?}").contains("may not be changed"), "{e:?}");
        let removed = pod(json!([]));
        let e = merge(&old, &removed).unwrap_err();
        assert!(format!("{e:?}").contains("may not be removed"), "{e:?}");
        let no_image = pod(json!([{"name": "a", "image": "i"}, {"name": "b"}]));
        assert!(merge(&old, &no_image).is_err());
    }
}
