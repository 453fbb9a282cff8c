//! Target → pod and remote port. Pods of a Service or workload are chosen
//! among the Running, not-deleting pods its selector matches (Ready ones
//! first), and re-chosen on every new connection, so a replaced pod is
//! followed.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, ReplicationController, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ListParams;
use kube::{Api, Client};

use super::cache::{Cache, Cached};
use super::spec::{Kind, PortPair, Protocol, RemotePort, Target};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The target does not exist (deleted, or a wrong name).
    #[error("{0}")]
    Gone(String),
    /// The target exists but has no pod to forward to right now.
    #[error("{0}")]
    NotReady(String),
    /// A port does not exist on the target or the chosen pod.
    #[error("{0}")]
    Port(String),
    /// The API refused (403 and other API errors).
    #[error("{0}")]
    Api(String),
    /// The API server could not be reached.
    #[error("cannot reach the API server: {0}")]
    Unreachable(String),
}

impl ResolveError {
    fn from_kube(what: &str, e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 404 => ResolveError::Gone(format!("{what} not found")),
            kube::Error::Api(s) if s.code == 403 => {
                ResolveError::Api(format!("no permission (403 Forbidden): {}", s.message))
            }
            kube::Error::Api(s) => ResolveError::Api(format!(
                "the API server refused ({} {}): {}",
                s.code, s.reason, s.message
            )),
            e => ResolveError::Unreachable(super::kube_cause(&e)),
        }
    }
}

/// A pod to forward to.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub pod: Pod,
    pub name: String,
}

impl Resolved {
    /// The container port named `name` of `protocol`.
    fn container_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name)
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol.k8s()
            })
            .and_then(|p| u16::try_from(p.container_port).ok())
    }

    /// The pod's IP (`status.podIP`).
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
    }

    /// The node the pod runs on (`spec.nodeName`).
    pub fn node(&self) -> Option<&str> {
        self.pod.spec.as_ref()?.node_name.as_deref()
    }
}

pub struct Resolver {
    client: Client,
    cache: Option<Cache>,
    pub namespace: String,
    pub target: Target,
    /// The last pod chosen for a Service or workload (kept while it stays
    /// as good a choice), and whether it was ready.
    last: std::sync::Mutex<Option<(String, bool)>>,
}

fn pod_running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn pod_ready(p: &Pod) -> bool {
    pod_running(p)
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod to forward to among `pods`, and whether it is ready: a Running,
/// Ready one (`last`, the one chosen before, while it stays among them,
/// else the first by name); when none is ready, a Running one that is not
/// (the same way). kubectl only requires Running and merely sorts ready
/// pods first, and a pod failing its readiness probe is what one
/// port-forwards to in order to debug it. Terminating pods are never
/// chosen: their replacement is waited for instead.
fn pick<'a>(pods: impl Iterator<Item = &'a Pod>, last: Option<&str>) -> Option<(&'a Pod, bool)> {
    let (mut ready, mut unready): (Vec<&Pod>, Vec<&Pod>) =
        pods.filter(|p| pod_running(p)).partition(|p| pod_ready(p));
    let is_ready = !ready.is_empty();
    let candidates = if is_ready { &mut ready } else { &mut unready };
    candidates.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let i = last
        .and_then(|l| {
            candidates
                .iter()
                .position(|p| p.metadata.name.as_deref() == Some(l))
        })
        .unwrap_or(0);
    candidates.get(i).map(|p| (*p, is_ready))
}

/// `k=v,k2=v2`, as a label selector query says it.
pub(super) fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A target object that picks pods: its selector as a label selector query
/// (empty when it has none). The API path and the watch cache both ask it.
pub(super) trait PodSelector {
    fn pod_selector(&self) -> String;
}

impl PodSelector for Service {
    fn pod_selector(&self) -> String {
        let sel = self.spec.as_ref().and_then(|s| s.selector.as_ref());
        sel.map(label_selector).unwrap_or_default()
    }
}

macro_rules! workload_pod_selector {
    ($($kind:ty),*) => {$(
        impl PodSelector for $kind {
            fn pod_selector(&self) -> String {
                workload_selector(&self.spec.selector)
            }
        }
    )*};
}
workload_pod_selector!(Deployment, StatefulSet, ReplicaSet, DaemonSet);

/// A Job's selector is set by the API server when the Job is created.
impl PodSelector for Job {
    fn pod_selector(&self) -> String {
        let sel = self.spec.as_ref().and_then(|s| s.selector.as_ref());
        sel.map(workload_selector).unwrap_or_default()
    }
}

/// A ReplicationController's selector is a plain map (defaulted from its
/// template's labels by the API server).
impl PodSelector for ReplicationController {
    fn pod_selector(&self) -> String {
        let sel = self.spec.as_ref().and_then(|s| s.selector.as_ref());
        sel.map(label_selector).unwrap_or_default()
    }
}

/// A workload's selector as a label selector query: its `matchLabels` and
/// its `matchExpressions` (`key in (a,b)`, `key notin (a,b)`, `key`,
/// `!key`), which the API server evaluates as it does for the workload's
/// own controller. Empty when it selects nothing in particular.
pub(super) fn workload_selector(sel: &LabelSelector) -> String {
    let mut parts = Vec::new();
    if let Some(m) = &sel.match_labels {
        parts.push(label_selector(m));
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = || e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({})", e.key, values()),
            "NotIn" => format!("{} notin ({})", e.key, values()),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            // The API server refuses such a workload; should one exist,
            // the query is refused with the operator named.
            other => format!("{} {other} ({})", e.key, values()),
        });
    }
    parts.retain(|p| !p.is_empty());
    parts.join(",")
}

impl Resolver {
    pub fn new(client: Client, namespace: String, target: Target) -> Self {
        Resolver {
            client,
            cache: None,
            namespace,
            target,
            last: Default::default(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The pod selector of the target, a workload of kind `K`, from a GET.
    async fn selector_of<K>(&self) -> Result<String, ResolveError>
    where
        K: PodSelector
            + kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let object = self.api::<K>().get(&self.target.name).await;
        let object = object.map_err(|e| ResolveError::from_kube(&self.what(), e))?;
        Ok(object.pod_selector())
    }

    fn what(&self) -> String {
        format!(
            "{} {:?} in namespace {:?}",
            self.target.kind.noun(),
            self.target.name,
            self.namespace
        )
    }

    /// The pod to forward to now, and the Service (for svc/ targets): from
    /// the watch cache when it knows, else with GET/LIST requests.
    pub async fn pod(&self) -> Result<(Resolved, Option<Service>), ResolveError> {
        let cached = match &self.cache {
            Some(c) => c.lookup(),
            None => Cached::Unknown,
        };
        match cached {
            Cached::Unknown => self.pod_from_api().await,
            // A watch failed: ask the API server itself. When it answers, it
            // is back (a re-established watch says nothing until a change).
            Cached::Unreachable(_) => {
                let r = self.pod_from_api().await;
                if !matches!(r, Err(ResolveError::Unreachable(_))) {
                    if let Some(c) = &self.cache {
                        c.reachable();
                    }
                }
                r
            }
            Cached::Gone => Err(ResolveError::Gone(format!("{} not found", self.what()))),
            Cached::Pod(pod) => self.check_pod((*pod).clone()).map(|r| (r, None)),
            Cached::Selected {
                selector: _,
                service,
                pods,
            } => self
                .choose(pods.iter().map(|p| p.as_ref()))
                .map(|r| (r, service.map(|s| *s))),
        }
    }

    /// Starts the watch cache (GET/LIST stay the fallback).
    pub fn start_cache(&mut self) {
        self.cache = Some(Cache::start(
            self.client.clone(),
            self.namespace.clone(),
            self.target.clone(),
        ));
    }

    /// `pod/NAME`: the pod, if it can be forwarded to.
    fn check_pod(&self, pod: Pod) -> Result<Resolved, ResolveError> {
        let name = &self.target.name;
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(ResolveError::NotReady(format!("pod {name} is terminating")));
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into());
        if phase != "Running" {
            return Err(ResolveError::NotReady(format!(
                "pod {name} is not running (phase {phase})"
            )));
        }
        Ok(Resolved {
            pod,
            name: name.clone(),
        })
    }

    /// The pod to forward to among `pods` (see [`pick`]), with a warning
    /// when it is not ready.
    fn choose<'a>(&self, pods: impl Iterator<Item = &'a Pod>) -> Result<Resolved, ResolveError> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let Some((pod, is_ready)) = pick(pods, last.as_ref().map(|(l, _)| l.as_str())) else {
            return Err(ResolveError::NotReady(format!(
                "{} has no running pod",
                self.what()
            )));
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        // Once per pod chosen while not ready (not on every connection).
        if !is_ready && last.as_ref() != Some(&(name.clone(), false)) {
            tracing::warn!(
                "pod {name} of {} is not ready: forwarding to it anyway, as kubectl does (no pod is ready)",
                self.target
            );
        }
        *last = Some((name.clone(), is_ready));
        Ok(Resolved {
            pod: pod.clone(),
            name,
        })
    }

    async fn pod_from_api(&self) -> Result<(Resolved, Option<Service>), ResolveError> {
        let name = &self.target.name;
        let what = self.what();
        let err = |e| ResolveError::from_kube(&what, e);
        let (selector, service) = match self.target.kind {
            Kind::Pod => {
                let pod = self.api::<Pod>().get(name).await.map_err(err)?;
                return self.check_pod(pod).map(|r| (r, None));
            }
            Kind::Service => {
                let svc = self.api::<Service>().get(name).await.map_err(err)?;
                let sel = svc.pod_selector();
                if sel.is_empty() {
                    return Err(ResolveError::Port(format!(
                        "service {name} has no selector: there is no pod to forward to"
                    )));
                }
                (sel, Some(svc))
            }
            Kind::Deployment => (self.selector_of::<Deployment>().await?, None),
            Kind::StatefulSet => (self.selector_of::<StatefulSet>().await?, None),
            Kind::ReplicaSet => (self.selector_of::<ReplicaSet>().await?, None),
            Kind::DaemonSet => (self.selector_of::<DaemonSet>().await?, None),
            Kind::Job => (self.selector_of::<Job>().await?, None),
            Kind::ReplicationController => {
                (self.selector_of::<ReplicationController>().await?, None)
            }
        };
        if selector.is_empty() {
            return Err(ResolveError::Port(format!(
                "{} has an empty selector: there is no pod to forward to",
                self.what()
            )));
        }
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| ResolveError::from_kube("pods", e))?;
        self.choose(pods.items.iter()).map(|r| (r, service))
    }
}

/// The Service port `pair` names (its number or name) of the pair's
/// protocol. One of the other protocol only is named as such, with the
/// pair that forwards it (kubectl: "UDP protocol is not supported").
fn service_port<'a>(svc: &'a Service, pair: &PortPair) -> Result<&'a ServicePort, ResolveError> {
    let svc_name = svc.metadata.name.as_deref().unwrap_or_default();
    let named = |p: &&ServicePort| match &pair.remote {
        RemotePort::Number(n) => p.port == i32::from(*n),
        RemotePort::Name(n) => p.name.as_deref() == Some(n.as_str()),
    };
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    let proto = |p: &ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
    let (same, other): (Vec<_>, Vec<_>) = ports
        .into_iter()
        .flatten()
        .filter(named)
        .partition(|p| proto(p) == pair.protocol.k8s());
    if let Some(p) = same.first() {
        return Ok(p);
    }
    let remote = &pair.remote;
    let udp = if pair.protocol == Protocol::Udp {
        "UDP "
    } else {
        ""
    };
    Err(ResolveError::Port(match other.first() {
        Some(p) if proto(p) == "UDP" => {
            format!("service {svc_name} port {remote} is UDP: forward it as {pair}/udp")
        }
        Some(p) if proto(p) == "TCP" => {
            let tcp = PortPair {
                protocol: Protocol::Tcp,
                ..pair.clone()
            };
            format!("service {svc_name} port {remote} is TCP, not UDP: forward it as {tcp}")
        }
        Some(p) => format!(
            "service {svc_name} port {remote} is {}: kproxy forwards TCP and UDP only",
            proto(p)
        ),
        None => format!("service {svc_name} has no {udp}port {remote}"),
    }))
}

/// The pod's port for `pair` (a Service port maps to its targetPort).
pub fn pod_port(
    pod: &Resolved,
    service: Option<&Service>,
    pair: &PortPair,
) -> Result<u16, ResolveError> {
    let protocol = pair.protocol;
    let udp = if protocol == Protocol::Udp {
        "UDP "
    } else {
        ""
    };
    let by_name = |n: &str| {
        pod.container_port(n, protocol).ok_or_else(|| {
            ResolveError::Port(format!(
                "pod {} has no {udp}container port named {n:?}",
                pod.name
            ))
        })
    };
    let Some(svc) = service else {
        return match &pair.remote {
            RemotePort::Number(n) => Ok(*n),
            RemotePort::Name(n) => by_name(n),
        };
    };
    let sp = service_port(svc, pair)?;
    match &sp.target_port {
        None => u16::try_from(sp.port)
            .map_err(|_| ResolveError::Port(format!("service port {} is invalid", sp.port))),
        Some(IntOrString::Int(i)) => u16::try_from(*i)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ResolveError::Port(format!("service targetPort {i} is invalid"))),
        Some(IntOrString::String(n)) => by_name(n),
    }
}

/// The local port of `pair`, given its pod port `pod_port`: the pair's,
/// or for the bare `PORT` form what kubectl makes of it: for a Service the
/// Service port's number (`svc/web http` with port http 80 -> targetPort
/// 8080 listens on 80), else the pod port (`pod/web http` -> 8080:8080).
pub fn local_port(
    service: Option<&Service>,
    pair: &PortPair,
    pod_port: u16,
) -> Result<u16, ResolveError> {
    if !pair.same {
        return Ok(pair.local);
    }
    let Some(svc) = service else {
        return Ok(pod_port);
    };
    let sp = service_port(svc, pair)?;
    u16::try_from(sp.port)
        .map_err(|_| ResolveError::Port(format!("service port {} is invalid", sp.port)))
}

impl Resolver {
    /// The pod and pod port of each pair.
    pub async fn resolve(&self, pairs: &[PortPair]) -> Result<(Resolved, Vec<u16>), ResolveError> {
        let (pod, ports) = self.resolve_local(pairs).await?;
        Ok((pod, ports.into_iter().map(|(_, remote)| remote).collect()))
    }

    /// The pod, and the local and pod port of each pair (at start: a bare
    /// port name's local port is decided then, once).
    pub async fn resolve_local(
        &self,
        pairs: &[PortPair],
    ) -> Result<(Resolved, Vec<(u16, u16)>), ResolveError> {
        let (pod, svc) = self.pod().await?;
        let ports = pairs
            .iter()
            .map(|p| {
                let remote = pod_port(&pod, svc.as_ref(), p)?;
                Ok((local_port(svc.as_ref(), p, remote)?, remote))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((pod, ports))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Resolved {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [
                {"name": "a", "ports": [{"name": "http", "containerPort": 8080}]},
                {"name": "b", "ports": [{"name": "metrics", "containerPort": 9090}, {"containerPort": 7000}]}
            ]}
        }))
        .unwrap();
        Resolved {
            pod,
            name: "web-1".into(),
        }
    }

    fn svc(ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"ports": ports}}))
            .unwrap()
    }

    /// The pod port of `local:remote` (24080:REMOTE).
    fn port(
        p: &Resolved,
        s: Option<&Service>,
        remote: RemotePort,
        protocol: Protocol,
    ) -> Result<u16, ResolveError> {
        let pair = PortPair {
            local: 24080,
            remote,
            protocol,
            same: false,
        };
        pod_port(p, s, &pair)
    }

    fn num(n: u16) -> RemotePort {
        RemotePort::Number(n)
    }

    fn name(n: &str) -> RemotePort {
        RemotePort::Name(n.into())
    }

    #[test]
    fn pod_ports_by_number_and_name() {
        let p = pod();
        assert_eq!(port(&p, None, num(1234), Protocol::Tcp).unwrap(), 1234);
        assert_eq!(port(&p, None, name("http"), Protocol::Tcp).unwrap(), 8080);
        assert_eq!(
            port(&p, None, name("metrics"), Protocol::Tcp).unwrap(),
            9090
        );
        let e = port(&p, None, name("grpc"), Protocol::Tcp).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pod web-1 has no container port named \"grpc\""
        );
    }

    #[test]
    fn service_ports_map_to_target_ports() {
        let p = pod();
        let s = svc(json!([
            {"name": "web", "port": 80, "targetPort": "http"},
            {"name": "mon", "port": 9000, "targetPort": 9090},
            {"name": "same", "port": 7000},
            {"name": "bad", "port": 81, "targetPort": "nope"}
        ]));
        assert_eq!(port(&p, Some(&s), num(80), Protocol::Tcp).unwrap(), 8080);
        assert_eq!(
            port(&p, Some(&s), name("web"), Protocol::Tcp).unwrap(),
            8080
        );
        assert_eq!(port(&p, Some(&s), num(9000), Protocol::Tcp).unwrap(), 9090);
        assert_eq!(
            port(&p, Some(&s), name("mon"), Protocol::Tcp).unwrap(),
            9090
        );
        assert_eq!(port(&p, Some(&s), num(7000), Protocol::Tcp).unwrap(), 7000);
        // A container port number is not a Service port.
        assert_eq!(
            port(&p, Some(&s), num(8080), Protocol::Tcp)
                .unwrap_err()
                .to_string(),
            "service web has no port 8080"
        );
        assert_eq!(
            port(&p, Some(&s), name("http"), Protocol::Tcp)
                .unwrap_err()
                .to_string(),
            "service web has no port http"
        );
        assert!(matches!(
            port(&p, Some(&s), num(81), Protocol::Tcp),
            Err(ResolveError::Port(m)) if m.contains("no container port named \"nope\"")
        ));
    }

    #[test]
    fn udp_ports_are_their_own() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "dns-1"},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
                {"name": "dns-tcp", "containerPort": 5353}]}]}
        }))
        .unwrap();
        let p = Resolved {
            pod: p,
            name: "dns-1".into(),
        };
        let s = svc(json!([
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
            {"name": "dns-tcp", "port": 53, "targetPort": "dns-tcp"},
            {"name": "tcp-only", "port": 80}
        ]));
        assert_eq!(port(&p, Some(&s), num(53), Protocol::Udp).unwrap(), 5353);
        assert_eq!(port(&p, Some(&s), num(53), Protocol::Tcp).unwrap(), 5353);
        assert_eq!(
            port(&p, Some(&s), num(80), Protocol::Udp)
                .unwrap_err()
                .to_string(),
            "service web port 80 is TCP, not UDP: forward it as 24080:80"
        );
        assert_eq!(
            port(&p, Some(&s), num(81), Protocol::Udp)
                .unwrap_err()
                .to_string(),
            "service web has no UDP port 81"
        );
        assert_eq!(port(&p, None, name("dns"), Protocol::Udp).unwrap(), 5353);
        assert_eq!(
            port(&p, None, name("dns-tcp"), Protocol::Udp)
                .unwrap_err()
                .to_string(),
            "pod dns-1 has no UDP container port named \"dns-tcp\""
        );
    }

    #[test]
    fn a_port_of_the_other_protocol_is_named_with_the_pair_to_use() {
        let p = pod();
        let s = svc(json!([
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            {"name": "web", "port": 80, "targetPort": "http"},
            {"name": "sctp", "port": 9, "protocol": "SCTP"}
        ]));
        let err = |spec: &str| {
            let pair = crate::forward::spec::parse_port_pair(spec).unwrap();
            pod_port(&p, Some(&s), &pair).unwrap_err().to_string()
        };
        assert_eq!(
            err("24080:53"),
            "service web port 53 is UDP: forward it as 24080:53/udp"
        );
        assert_eq!(
            err("24080:dns"),
            "service web port dns is UDP: forward it as 24080:dns/udp"
        );
        assert_eq!(
            err("dns"),
            "service web port dns is UDP: forward it as dns/udp"
        );
        assert_eq!(
            err(":80/udp"),
            "service web port 80 is TCP, not UDP: forward it as :80"
        );
        assert_eq!(
            err("24080:9"),
            "service web port 9 is SCTP: kproxy forwards TCP and UDP only"
        );
        assert_eq!(err("24080:54"), "service web has no port 54");
    }

    #[test]
    fn a_bare_port_listens_on_its_resolved_number() {
        let p = pod();
        let s = svc(json!([
            {"name": "web", "port": 80, "targetPort": "http"},
            {"name": "mon", "port": 9000, "targetPort": 9090}
        ]));
        let ports = |svc: Option<&Service>, spec: &str| {
            let pair = crate::forward::spec::parse_port_pair(spec).unwrap();
            let remote = pod_port(&p, svc, &pair).unwrap();
            (local_port(svc, &pair, remote).unwrap(), remote)
        };
        // As kubectl: a pod's container port on both sides; a Service's
        // port locally, its targetPort on the pod.
        assert_eq!(ports(None, "http"), (8080, 8080));
        assert_eq!(ports(None, "metrics"), (9090, 9090));
        assert_eq!(ports(Some(&s), "web"), (80, 8080));
        assert_eq!(ports(Some(&s), "mon"), (9000, 9090));
        assert_eq!(ports(Some(&s), "9000"), (9000, 9090));
        // Given local ports stay.
        assert_eq!(ports(Some(&s), "7000:web"), (7000, 8080));
        assert_eq!(ports(None, ":http"), (0, 8080));
    }

    #[test]
    fn readiness() {
        let p = |phase: &str, ready: &str, deleting: bool| -> Pod {
            let mut v = json!({"metadata": {"name": "x"},
                "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]}});
            if deleting {
                v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            serde_json::from_value(v).unwrap()
        };
        assert!(pod_ready(&p("Running", "True", false)));
        assert!(!pod_ready(&p("Running", "False", false)));
        assert!(!pod_ready(&p("Pending", "True", false)));
        assert!(!pod_ready(&p("Running", "True", true)));
        assert!(pod_running(&p("Running", "False", false)));
    }

    #[test]
    fn ready_pods_first_then_running_ones() {
        let p = |name: &str, phase: &str, ready: &str, deleting: bool| -> Pod {
            let mut v = json!({"metadata": {"name": name},
                "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]}});
            if deleting {
                v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            serde_json::from_value(v).unwrap()
        };
        let name =
            |r: Option<(&Pod, bool)>| r.map(|(p, ready)| (p.metadata.name.clone().unwrap(), ready));
        let pods = [
            p("c-unready", "Running", "False", false),
            p("b-ready", "Running", "True", false),
            p("a-ready", "Running", "True", false),
        ];
        assert_eq!(
            name(pick(pods.iter(), None)),
            Some(("a-ready".into(), true))
        );
        assert_eq!(
            name(pick(pods.iter(), Some("b-ready"))),
            Some(("b-ready".into(), true))
        );
        // The last pod, not ready any more, gives way to a ready one.
        assert_eq!(
            name(pick(pods.iter(), Some("c-unready"))),
            Some(("a-ready".into(), true))
        );
        // None ready: a running one, by name, and kept while it stays the best.
        let pods = [
            p("z-unready", "Running", "False", false),
            p("a-deleting", "Running", "True", true),
            p("b-pending", "Pending", "False", false),
            p("y-unready", "Running", "False", false),
        ];
        assert_eq!(
            name(pick(pods.iter(), None)),
            Some(("y-unready".into(), false))
        );
        assert_eq!(
            name(pick(pods.iter(), Some("z-unready"))),
            Some(("z-unready".into(), false))
        );
        // Nothing running (or only terminating): none.
        assert_eq!(name(pick(pods[1..3].iter(), None)), None);
    }

    #[test]
    fn selectors() {
        let mut m = BTreeMap::new();
        m.insert("app".to_string(), "web".to_string());
        m.insert("tier".to_string(), "fe".to_string());
        assert_eq!(label_selector(&m), "app=web,tier=fe");
    }

    #[test]
    fn workload_selectors_keep_their_expressions() {
        let sel: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["fe", "edge"]},
                {"key": "track", "operator": "NotIn", "values": ["canary"]},
                {"key": "owner", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"}
            ]
        }))
        .unwrap();
        assert_eq!(
            workload_selector(&sel),
            "app=web,tier in (fe,edge),track notin (canary),owner,!legacy"
        );
        let only: LabelSelector = serde_json::from_value(json!({
            "matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]
        }))
        .unwrap();
        assert_eq!(workload_selector(&only), "app in (web)");
        assert_eq!(workload_selector(&LabelSelector::default()), "");
    }
}
