//! Real servers on 127.0.0.1 ephemeral ports, real HTTP requests.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::testclient::get;
use super::*;
use crate::metrics::DesiredCounts;
use crate::model::{
    ChangeSet, DesiredState, Endpoint, Protocol, ServiceKey, ServicePort, ServicePortName,
    TrafficPolicy,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn spawn(router: Router) -> SocketAddr {
    let listener = bind(SocketAddr::new(LOCALHOST, 0), "--test-address")
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_on(listener, router));
    addr
}

/// A port that was free a moment ago (the kernel hands out ephemeral ports
/// round-robin, so reuse by someone else right away is unlikely).
fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free ports (all held until each is known).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

fn endpoint(ip: [u8; 4], port: u16, is_local: bool, ready: bool) -> Endpoint {
    Endpoint {
        ip: IpAddr::from(ip),
        port,
        node_name: Some(if is_local { "me" } else { "other" }.into()),
        is_local,
        ready,
        serving: ready,
        terminating: !ready,
    }
}

fn service_port(
    ns: &str,
    name: &str,
    port_name: &str,
    hcnp: Option<u16>,
    eps: Vec<Endpoint>,
) -> ServicePort {
    let local: Vec<Endpoint> = eps
        .iter()
        .filter(|e| e.is_local && e.ready)
        .cloned()
        .collect();
    ServicePort {
        name: ServicePortName {
            service: ServiceKey::new(ns, name),
            port: port_name.into(),
            protocol: Protocol::Tcp,
        },
        cluster_ips: vec![IpAddr::from([10, 96, 0, 10])],
        port: 80,
        node_port: Some(30080),
        external_ips: vec![],
        load_balancer_ips: vec![IpAddr::from([192, 0, 2, 1])],
        load_balancer_source_ranges: vec![],
        external_policy: TrafficPolicy::Local,
        internal_policy: TrafficPolicy::Cluster,
        session_affinity_seconds: None,
        health_check_node_port: hcnp,
        cluster_endpoints: eps.iter().filter(|e| e.ready).cloned().collect(),
        local_endpoint_count: local.len(),
        external_endpoints: local,
        all_endpoints: eps,
    }
}

fn state(ports: Vec<ServicePort>) -> DesiredState {
    DesiredState {
        services: ports
            .into_iter()
            .map(|p| (p.name.clone(), std::sync::Arc::new(p)))
            .collect(),
        ..DesiredState::default()
    }
}

fn synced_health() -> Arc<HealthState> {
    let health = Arc::new(HealthState::new(Duration::from_secs(60)));
    health.updated(SystemTime::now());
    health
}

/// Polls until connecting to `addr` is refused; bounded by a deadline.
async fn assert_refused(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{addr} still accepting: {other:?}"
                );
                tokio::task::yield_now().await;
            }
        }
    }
}

#[tokio::test]
async fn healthz_503_before_first_sync_then_200() {
    let health = Arc::new(HealthState::new(Duration::from_secs(60)));
    let addr = spawn(healthz_router(
        health.clone(),
        Arc::new(Metrics::new(ProxyMode::Iptables)),
    ))
    .await;

    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let v = r.json();
    assert_eq!(v["lastUpdated"], "0001-01-01T00:00:00Z");
    assert!(v["currentTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["nodeEligible"], true);
    assert!(v["reason"]
        .as_str()
        .unwrap()
        .contains("not been programmed"));

    health.queued(SystemTime::now());
    health.updated(SystemTime::now());
    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["lastUpdated"], v["currentTime"]);
    assert!(v.get("reason").is_none());

    health.set_node_eligible(false);
    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["nodeEligible"], false);
    assert_eq!(get(addr, "/livez").await.unwrap().status, 200);
}

#[tokio::test]
async fn healthz_stalled_sync_is_503() {
    let health = Arc::new(HealthState::new(Duration::from_secs(30)));
    let addr = spawn(healthz_router(
        health.clone(),
        Arc::new(Metrics::new(ProxyMode::Iptables)),
    ))
    .await;
    let now = SystemTime::now();
    health.updated(now - Duration::from_secs(120));
    health.queued(now - Duration::from_secs(60));
    health.sync_failed("iptables-restore failed: line 3");
    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 503);
    let reason = r.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("iptables-restore failed: line 3"),
        "{reason}"
    );
}

#[tokio::test]
async fn metrics_server_routes() {
    let health = synced_health();
    let metrics = Arc::new(Metrics::new(ProxyMode::Iptables));
    metrics.set_programmed(3, 4);
    let addr = spawn(metrics_router(metrics, health, ProxyMode::Iptables)).await;

    let r = get(addr, "/proxyMode").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "iptables"));

    let r = get(addr, "/metrics").await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert!(r
        .body
        .contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram"));
    assert!(r.body.contains("kproxy_programmed_services 3\n"));

    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["nodeEligible"], true);
    assert_eq!(get(addr, "/nope").await.unwrap().status, 404);
}

/// Each answer of /healthz and /livez is counted by status code, so an
/// unhealthy proxy shows in the metrics as well as in the probe.
#[tokio::test]
async fn health_answers_are_counted_by_code() {
    let health = Arc::new(HealthState::new(Duration::from_secs(60)));
    let metrics = Arc::new(Metrics::new(ProxyMode::Iptables));
    let addr = spawn(metrics_router(metrics, health.clone(), ProxyMode::Iptables)).await;
    // Not synced yet: 503.
    assert_eq!(get(addr, "/healthz").await.unwrap().status, 503);
    assert_eq!(get(addr, "/livez").await.unwrap().status, 503);
    health.updated(SystemTime::now());
    assert_eq!(get(addr, "/healthz").await.unwrap().status, 200);
    let text = get(addr, "/metrics").await.unwrap().body;
    for line in [
        "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
        "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
        "kubeproxy_proxy_livez_total{code=\"503\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(
        text.contains("process_open_fds "),
        "process metrics missing"
    );
}

/// A client that connects and sends nothing is cut off after the
/// header-read timeout instead of holding the connection.
#[tokio::test]
async fn silent_clients_are_disconnected() {
    use tokio::io::AsyncReadExt;
    let addr = spawn(healthz_router(
        synced_health(),
        Arc::new(Metrics::new(ProxyMode::Iptables)),
    ))
    .await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(
        HEADER_READ_TIMEOUT + Duration::from_secs(10),
        silent.read(&mut buf),
    )
    .await
    .expect("the server must close a silent connection")
    .unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        waited >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed after {waited:?}, before the timeout"
    );
    // hyper answers 408 or just closes; either way the connection ends.
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
}

/// Past the connection cap, new connections are closed at once and the
/// server keeps answering once connections go away.
#[tokio::test]
async fn connections_over_the_cap_are_closed() {
    use tokio::io::AsyncReadExt;
    let addr = spawn(healthz_router(
        synced_health(),
        Arc::new(Metrics::new(ProxyMode::Iptables)),
    ))
    .await;
    let mut held = Vec::with_capacity(MAX_CONNECTIONS);
    for _ in 0..MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Wait until the server has taken all of them (a request on the last
    // one is answered once it is served).
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf))
        .await
        .expect("an extra connection must be closed at once")
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "the extra connection got data instead of being closed"
    );
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match get(addr, "/healthz").await {
            Ok(r) if r.status == 200 => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "server did not recover: {other:?}"
                );
                tokio::task::yield_now().await;
            }
        }
    }
}

#[tokio::test]
async fn bind_error_names_the_flag() {
    let first = bind(SocketAddr::new(LOCALHOST, 0), "--healthz-bind-address")
        .await
        .unwrap();
    let addr = first.local_addr().unwrap();
    let err = serve_healthz(
        addr,
        synced_health(),
        Arc::new(Metrics::new(ProxyMode::Iptables)),
        true,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot listen on {addr}: address in use: set --healthz-bind-address to a free address"
        )
    );
    let other = SocketAddr::from(([192, 0, 2, 1], 10249));
    let err = bind(other, "--metrics-bind-address").await.unwrap_err();
    assert!(
        err.to_string().contains("set --metrics-bind-address"),
        "{err}"
    );
}

#[tokio::test]
async fn health_check_node_port_lifecycle() {
    let health = synced_health();
    let mut servers = HealthCheckServers::new(vec![LOCALHOST], health.clone());
    let port = free_port();
    let addr = SocketAddr::new(LOCALHOST, port);

    // One local ready endpoint, one remote, one local terminating.
    let eps = vec![
        endpoint([10, 244, 1, 5], 8080, true, true),
        endpoint([10, 244, 2, 5], 8080, false, true),
        endpoint([10, 244, 1, 6], 8080, true, false),
    ];
    servers.sync(&state(vec![service_port(
        "shop",
        "web",
        "",
        Some(port),
        eps,
    )]));
    assert_eq!(
        servers.serving().get(&ServiceKey::new("shop", "web")),
        Some(&vec![addr])
    );

    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("1"));
    // Any path answers, as in kube-proxy.
    assert_eq!(get(addr, "/whatever").await.unwrap().status, 200);

    // Local endpoints vanish: same listener, now 503.
    let eps = vec![
        endpoint([10, 244, 2, 5], 8080, false, true),
        endpoint([10, 244, 1, 6], 8080, true, false),
    ];
    servers.sync(&state(vec![service_port(
        "shop",
        "web",
        "",
        Some(port),
        eps,
    )]));
    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 503);
    let v = r.json();
    assert_eq!(v["localEndpoints"], 0);
    assert_eq!(v["serviceProxyHealthy"], true);

    // Service goes away: the port is closed by the time sync returns.
    servers.sync(&state(vec![]));
    assert!(servers.serving().is_empty());
    let err = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn proxy_unhealthy_makes_service_503() {
    let health = Arc::new(HealthState::new(Duration::from_secs(60)));
    let mut servers = HealthCheckServers::new(vec![LOCALHOST], health.clone());
    let port = free_port();
    let eps = vec![endpoint([10, 244, 1, 5], 8080, true, true)];
    servers.sync(&state(vec![service_port(
        "shop",
        "web",
        "",
        Some(port),
        eps,
    )]));
    let addr = SocketAddr::new(LOCALHOST, port);

    let r = get(addr, "/").await.unwrap();
    assert_eq!(r.status, 503);
    let v = r.json();
    assert_eq!(v["localEndpoints"], 1);
    assert_eq!(v["serviceProxyHealthy"], false);

    health.updated(SystemTime::now());
    assert_eq!(get(addr, "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn ports_of_one_service_share_one_server() {
    let health = synced_health();
    let mut servers = HealthCheckServers::new(vec![LOCALHOST], health);
    let port = free_port();
    // The same pod behind two ports counts once; a second local pod on one port.
    let http = service_port(
        "shop",
        "web",
        "http",
        Some(port),
        vec![endpoint([10, 244, 1, 5], 8080, true, true)],
    );
    let https = service_port(
        "shop",
        "web",
        "https",
        Some(port),
        vec![
            endpoint([10, 244, 1, 5], 8443, true, true),
            endpoint([10, 244, 1, 7], 8443, true, true),
        ],
    );
    // A Service without healthCheckNodePort gets no server.
    let plain = service_port("shop", "db", "", None, vec![]);
    // Nor does one with externalTrafficPolicy Cluster, whatever the field says.
    let mut cluster = service_port("shop", "cache", "", Some(free_port()), vec![]);
    cluster.external_policy = TrafficPolicy::Cluster;
    servers.sync(&state(vec![http, https, plain, cluster]));
    assert_eq!(servers.serving().len(), 1);
    let r = get(SocketAddr::new(LOCALHOST, port), "/healthz")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["localEndpoints"], 2);
}

#[tokio::test]
async fn busy_port_is_retried_at_next_sync() {
    let health = synced_health();
    let mut servers = HealthCheckServers::new(vec![LOCALHOST], health);
    let blocker = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = blocker.local_addr().unwrap().port();
    let desired = state(vec![service_port(
        "shop",
        "web",
        "",
        Some(port),
        vec![endpoint([10, 244, 1, 5], 8080, true, true)],
    )]);

    servers.sync(&desired);
    assert!(
        servers.serving().is_empty(),
        "port is taken, nothing serves"
    );

    drop(blocker);
    servers.sync(&desired);
    assert_eq!(servers.serving().len(), 1);
    let r = get(SocketAddr::new(LOCALHOST, port), "/healthz")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// One address that cannot be bound (192.0.2.1 is on no interface here:
/// EADDRNOTAVAIL, as for an IPv6 address still in DAD) leaves the others
/// serving, and is reported with its error.
#[tokio::test]
async fn an_address_that_cannot_be_bound_leaves_the_others_serving() {
    let health = synced_health();
    let absent = IpAddr::from([192, 0, 2, 1]);
    let mut servers = HealthCheckServers::new(vec![absent, LOCALHOST], health);
    let port = free_port();
    servers.sync(&state(vec![service_port(
        "shop",
        "web",
        "",
        Some(port),
        vec![endpoint([10, 244, 1, 5], 8080, true, true)],
    )]));

    let web = ServiceKey::new("shop", "web");
    let served = SocketAddr::new(LOCALHOST, port);
    assert_eq!(servers.serving().get(&web), Some(&vec![served]));
    let r = get(served, "/healthz").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let not_bound = servers.not_bound();
    let failed = &not_bound[&web];
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, SocketAddr::new(absent, port));
    assert!(failed[0].1.contains("os error 99"), "{}", failed[0].1);
    assert!(servers.next_retry().is_some());
}

/// An address that failed is tried again on a growing (capped) backoff,
/// with no Service change, until it binds; then it serves.
#[tokio::test]
async fn a_failed_address_is_retried_on_its_own_until_it_binds() {
    let health = synced_health();
    let late = IpAddr::from([127, 0, 0, 2]);
    let binder = FlakyBinder::default().failing(late, 2);
    let mut servers =
        HealthCheckServers::with_binder(vec![LOCALHOST, late], health, Box::new(binder.clone()));
    let port = free_port();
    let web = ServiceKey::new("shop", "web");
    servers.sync(&state(vec![service_port(
        "shop",
        "web",
        "",
        Some(port),
        vec![endpoint([10, 244, 1, 5], 8080, true, true)],
    )]));
    assert_eq!(
        servers.serving().get(&web),
        Some(&vec![SocketAddr::new(LOCALHOST, port)])
    );
    assert_eq!(binder.attempts(late), 1);

    // Not due yet: nothing is tried.
    let first = servers.next_retry().expect("a retry is scheduled");
    servers.retry_due(first - Duration::from_millis(1));
    assert_eq!(binder.attempts(late), 1);

    // Due: tried, fails again, and waits longer before the next try.
    servers.retry_due(first);
    assert_eq!(binder.attempts(late), 2);
    let second = servers.next_retry().expect("still scheduled");
    assert!(
        second - first > Duration::from_millis(1500),
        "{:?}",
        second - first
    );
    assert!(second - first <= BIND_RETRY);

    servers.retry_due(second);
    assert_eq!(binder.attempts(late), 3);
    assert_eq!(servers.next_retry(), None);
    assert!(servers.not_bound().is_empty());
    assert_eq!(servers.serving()[&web].len(), 2);
    let r = get(SocketAddr::new(late, port), "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// IPv6 link-local addresses need a scope id to be bound: they are left
/// out (kube-proxy never serves them on their own), and an address list of
/// only such addresses serves nothing rather than every address.
#[tokio::test]
async fn link_local_addresses_are_left_out() {
    let link_local = IpAddr::from("fe80::1".parse::<std::net::Ipv6Addr>().unwrap());
    let port = free_port();
    let desired = state(vec![service_port(
        "shop",
        "web",
        "",
        Some(port),
        vec![endpoint([10, 244, 1, 5], 8080, true, true)],
    )]);

    let binder = FlakyBinder::default();
    let mut servers = HealthCheckServers::with_binder(
        vec![link_local, LOCALHOST],
        synced_health(),
        Box::new(binder.clone()),
    );
    servers.sync(&desired);
    assert_eq!(binder.attempts(link_local), 0);
    assert!(servers.not_bound().is_empty());
    assert_eq!(
        servers.serving()[&ServiceKey::new("shop", "web")],
        vec![SocketAddr::new(LOCALHOST, port)]
    );
    drop(servers);

    let binder = FlakyBinder::default();
    let mut servers = HealthCheckServers::with_binder(
        vec![link_local],
        synced_health(),
        Box::new(binder.clone()),
    );
    servers.sync(&desired);
    assert!(servers.serving().is_empty());
    assert!(servers.not_bound().is_empty());
    assert_eq!(binder.attempts(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), 0);
}

/// `--nodeport-addresses` that matches none of the node's addresses
/// serves healthCheckNodePorts nowhere (it used to mean everywhere).
#[tokio::test]
async fn a_nodeport_address_list_matching_nothing_serves_nowhere() {
    let port = free_port();
    let desired = state(vec![service_port(
        "shop",
        "web",
        "",
        Some(port),
        vec![endpoint([10, 244, 1, 5], 8080, true, true)],
    )]);
    let mut servers = HealthCheckServers::only_on(Vec::new(), synced_health());
    servers.sync(&desired);
    assert!(servers.serving().is_empty(), "{:?}", servers.serving());
    assert!(std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok());
}

#[tokio::test]
async fn changed_port_moves_the_server() {
    let health = synced_health();
    let mut servers = HealthCheckServers::new(vec![LOCALHOST], health);
    let eps = vec![endpoint([10, 244, 1, 5], 8080, true, true)];
    let [p1, p2] = free_ports::<2>();
    servers.sync(&state(vec![service_port(
        "shop",
        "web",
        "",
        Some(p1),
        eps.clone(),
    )]));
    assert_eq!(
        get(SocketAddr::new(LOCALHOST, p1), "/")
            .await
            .unwrap()
            .status,
        200
    );

    servers.sync(&state(vec![service_port("shop", "web", "", Some(p2), eps)]));
    assert_refused(SocketAddr::new(LOCALHOST, p1)).await;
    assert_eq!(
        get(SocketAddr::new(LOCALHOST, p2), "/")
            .await
            .unwrap()
            .status,
        200
    );

    // Dropping the servers closes everything.
    drop(servers);
    assert_refused(SocketAddr::new(LOCALHOST, p2)).await;
}

/// `kproxy status` asks the running kproxy for its frontends' status: the
/// counts and the ones not applied, or all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_status_reaches_kproxy_status() {
    use crate::dataplane::ebpf::test_support::{ep, state, svc};
    use crate::dataplane::ServiceError;
    use crate::model::{ChangeSet, Protocol};
    use crate::sync::frontends::Status;

    let metrics = Arc::new(Metrics::new(ProxyMode::Ebpf));
    let port = |name: &str, vip: &str| {
        svc(
            "default",
            name,
            "",
            Protocol::Udp,
            vip,
            53,
            vec![ep("10.244.1.5", 53, true)],
        )
    };
    let s = state(vec![port("a", "10.96.0.1"), port("b", "10.96.0.2")]);
    let now = std::time::Instant::now();
    {
        let mut t = metrics.frontend_table();
        t.begin(&s, &ChangeSet::between(&state(vec![]), &s), &[], true, now);
        let b = port("b", "10.96.0.2").name;
        t.finish(
            Ok(&[ServiceError {
                service: b.to_string(),
                port: b,
                reason: "map_full".into(),
                message: "BPF map FRONTENDS is full".into(),
                frontends: None,
            }]),
            now,
        );
    }
    let addr = spawn(metrics_router(metrics, synced_health(), ProxyMode::Ebpf))
        .await
        .to_string();
    let (some, all) = tokio::task::spawn_blocking(move || {
        (
            crate::status::frontends(&addr, false),
            crate::status::frontends(&addr, true),
        )
    })
    .await
    .unwrap();
    let some = some.expect("the agent answers");
    assert_eq!((some.counts.applied, some.counts.error), (1, 1));
    assert_eq!(some.frontends.len(), 1);
    let b = &some.frontends[0];
    assert_eq!(
        (b.service.as_str(), b.frontend.as_str(), b.status),
        ("default/b", "10.96.0.2:53/udp", Status::Error)
    );
    assert_eq!(b.error.as_deref(), Some("BPF map FRONTENDS is full"));
    assert_eq!(all.expect("the agent answers").frontends.len(), 2);
}

/// A sync that applied a change set looks only at the Services it changed
/// (and at ports not bound yet): servers open, follow their local
/// endpoints, move, are retried when busy, and close, as a full sync has
/// them.
#[tokio::test]
async fn sync_of_changes_follows_only_the_changed_services() {
    let health = synced_health();
    let mut servers = HealthCheckServers::new(vec![LOCALHOST], health);
    let [p1, p2] = free_ports::<2>();
    let one = vec![endpoint([10, 244, 1, 5], 8080, true, true)];
    let two = vec![
        endpoint([10, 244, 1, 5], 8080, true, true),
        endpoint([10, 244, 1, 6], 8080, true, true),
    ];
    let web = |port, eps| service_port("shop", "web", "", Some(port), eps);
    let db = |eps| service_port("shop", "db", "", None, eps);
    let local_endpoints = |port| async move {
        get(SocketAddr::new(LOCALHOST, port), "/")
            .await
            .unwrap()
            .json()["localEndpoints"]
            .clone()
    };
    let mut current = state(vec![]);
    let mut step = |servers: &mut HealthCheckServers, next: DesiredState| {
        servers.sync_changes(&next, &ChangeSet::between(&current, &next));
        current = next;
    };

    step(&mut servers, state(vec![web(p1, one.clone()), db(vec![])]));
    assert_eq!(local_endpoints(p1).await, 1);
    step(&mut servers, state(vec![web(p1, two.clone()), db(vec![])]));
    assert_eq!(local_endpoints(p1).await, 2);
    step(&mut servers, state(vec![web(p2, two.clone()), db(vec![])]));
    assert_refused(SocketAddr::new(LOCALHOST, p1)).await;
    assert_eq!(local_endpoints(p2).await, 2);

    // A new Service on a busy port: not served, and tried again at the
    // next sync even though that sync changes another Service.
    let blocker = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let busy = blocker.local_addr().unwrap().port();
    let api = service_port("shop", "api", "", Some(busy), one.clone());
    step(
        &mut servers,
        state(vec![web(p2, two.clone()), db(vec![]), api.clone()]),
    );
    assert!(!servers
        .serving()
        .contains_key(&ServiceKey::new("shop", "api")));
    drop(blocker);
    step(
        &mut servers,
        state(vec![web(p2, two.clone()), db(one.clone()), api]),
    );
    assert_eq!(local_endpoints(busy).await, 1);

    step(&mut servers, state(vec![]));
    assert!(servers.serving().is_empty());
    assert_refused(SocketAddr::new(LOCALHOST, p2)).await;
}

/// The programmed counts kept change by change equal a recount.
#[test]
fn programmed_counts_follow_changes_as_a_recount_has_them() {
    let eps = |n: u8| -> Vec<Endpoint> {
        (0..n)
            .map(|i| endpoint([10, 244, 1, i], 8080, i % 2 == 0, i % 3 != 0))
            .collect()
    };
    let states = [
        state(vec![]),
        state(vec![
            service_port("a", "web", "", Some(30001), eps(3)),
            service_port("a", "db", "", None, eps(0)),
        ]),
        state(vec![
            service_port("a", "web", "", Some(30001), eps(5)),
            service_port("a", "db", "", None, eps(2)),
            service_port("b", "web", "http", None, eps(1)),
        ]),
        state(vec![service_port("b", "web", "http", None, eps(4))]),
        state(vec![]),
    ];
    let mut counts = DesiredCounts::default();
    for pair in states.windows(2) {
        counts.update(&ChangeSet::between(&pair[0], &pair[1]));
        assert_eq!(counts, DesiredCounts::of(&pair[1]));
    }
}
