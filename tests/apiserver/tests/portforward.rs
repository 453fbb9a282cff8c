//! pods/portforward with the real `kube` client (WebSocket, v4.channel.k8s.io).

use k8s_openapi::api::core::v1::Pod;
use kproxy_test_apiserver::TestApiServer;
use kube::{Api, Client, Config};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup() -> (TestApiServer, Api<Pod>) {
    let server = TestApiServer::start().await.unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    (server, Api::namespaced(client, "default"))
}

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_bytes_both_ways_on_several_ports() {
    let (server, pods) = setup().await;
    server.apply(pod("web", "127.0.0.1")).unwrap();
    // Two "container ports": an echo server and one that greets and closes.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let greet = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (echo_port, greet_port) = (
        echo.local_addr().unwrap().port(),
        greet.local_addr().unwrap().port(),
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = greet.accept().await {
            let _ = s.write_all(b"hello from the pod").await;
        }
    });

    let mut pf = pods
        .portforward("web", &[echo_port, greet_port])
        .await
        .unwrap();
    let e = pf.take_stream(echo_port).unwrap();
    let mut g = pf.take_stream(greet_port).unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let p2 = payload.clone();
    let (mut er, mut ew) = tokio::io::split(e);
    let writer = tokio::spawn(async move { ew.write_all(&p2).await });
    let reader = tokio::spawn(async move {
        let mut back = vec![0u8; 200_000];
        er.read_exact(&mut back).await.map(|_| back)
    });
    let mut greeting = vec![0u8; 18];
    g.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello from the pod");
    let w = writer.await.unwrap();
    let r = reader.await.unwrap();
    if w.is_err() || r.is_err() {
        panic!(
            "write: {w:?}, read: {:?}; forwarder: {:?}",
            r.as_ref().map(|_| ()),
            pf.join().await
        );
    }
    assert_eq!(r.unwrap(), payload, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_port_is_reported_on_its_error_channel() {
    let (server, pods) = setup().await;
    server.apply(pod("web", "127.0.0.1")).unwrap();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut pf = pods.portforward("web", &[port]).await.unwrap();
    let err = pf.take_error(port).unwrap().await;
    let msg = err.expect("an error message on the error channel");
    assert!(
        msg.contains(&port.to_string()) && msg.contains("refused"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_pod_or_pod_ip_is_an_api_error() {
    let (server, pods) = setup().await;
    assert!(pods.portforward("nope", &[80]).await.is_err());
    let mut p = pod("pending", "127.0.0.1");
    p["status"] = json!({"phase": "Pending"});
    server.apply(p).unwrap();
    assert!(pods.portforward("pending", &[80]).await.is_err());
}

/// A raw WebSocket port-forward client offering `protocols`.
async fn ws_connect(
    server: &TestApiServer,
    pod: &str,
    port: u16,
    protocols: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Option<String>,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "ws://{}/api/v1/namespaces/default/pods/{pod}/portforward?ports={port}",
        server.addr()
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_string());
    Ok((ws, proto))
}

/// The status and body of a refused WebSocket upgrade.
fn refusal(e: tokio_tungstenite::tungstenite::Error) -> (u16, String) {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        e => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// An echo "container port".
async fn echo() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_v4_is_negotiated_unless_v5_is_opted_in() {
    let (server, _pods) = setup().await;
    server.apply(pod("web", "127.0.0.1")).unwrap();
    let port = echo().await;
    // As the real server: v5 offered first, v4 chosen.
    let (_ws, proto) = ws_connect(&server, "web", port, "v5.channel.k8s.io, v4.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    // v5 alone is refused, in plain text as the kubelet's wsstream.
    let (code, body) = refusal(
        ws_connect(&server, "web", port, "v5.channel.k8s.io")
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(body.contains("not supported"), "{body}");
    server.set_port_forward_v5(true);
    let (_ws, proto) = ws_connect(&server, "web", port, "v5.channel.k8s.io, v4.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(proto.as_deref(), Some("v5.channel.k8s.io"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_with_the_v5_close_signal_still_gets_the_reply() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (server, _pods) = setup().await;
    server.set_port_forward_v5(true);
    server.apply(pod("web", "127.0.0.1")).unwrap();
    // Reads until EOF, then answers with the byte count.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        s.write_all(format!("got {}", all.len()).as_bytes())
            .await
            .unwrap();
    });
    let (mut ws, proto) = ws_connect(&server, "web", port, "v5.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(proto.as_deref(), Some("v5.channel.k8s.io"));
    let p = port.to_le_bytes();
    // The port header on the data and the error channel.
    for ch in [0u8, 1] {
        let m = ws.next().await.unwrap().unwrap().into_data();
        assert_eq!(&m[..], &[ch, p[0], p[1]]);
    }
    ws.send(Message::binary(b"\x00hello".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
    let m = ws.next().await.unwrap().unwrap().into_data();
    assert_eq!(&m[..], b"\x00got 5");
    // The pod closed its side: the server ends the stream.
    let end = ws.next().await;
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "{end:?}");
}

/// The runtime's idle timer counts data messages (an empty one too) and
/// not pings; a proxy's counts anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timer_is_reset_by_data_not_by_pings() {
    use futures::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::Message;

    let (server, _pods) = setup().await;
    server.apply(pod("web", "127.0.0.1")).unwrap();
    let port = echo().await;
    server.set_port_forward_idle_timeout(Some(Duration::from_millis(400)));
    // Pings every 100 ms: cut all the same.
    let (mut ws, _) = ws_connect(&server, "web", port, "v4.channel.k8s.io")
        .await
        .unwrap();
    let pinger = async {
        for _ in 0..30 {
            if ws.send(Message::Ping(Default::default())).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    pinger.await;
    assert_eq!(server.port_forwards_idle_cut(), 1);
    // Empty data messages every 100 ms: kept.
    let (mut ws, _) = ws_connect(&server, "web", port, "v4.channel.k8s.io")
        .await
        .unwrap();
    for _ in 0..12 {
        ws.send(Message::binary(Vec::new())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.port_forwards_idle_cut(), 1);
    ws.send(Message::binary(b"\x00abc".to_vec())).await.unwrap();
    // The two port headers, then the echo.
    for _ in 0..2 {
        ws.next().await.unwrap().unwrap();
    }
    let m = ws.next().await.unwrap().unwrap().into_data();
    assert_eq!(&m[..], b"\x00abc");
    drop(ws);
    // A proxy's idle timer: pings do count.
    server.set_port_forward_idle_timeout(None);
    server.set_port_forward_proxy_idle_timeout(Some(Duration::from_millis(400)));
    let (mut ws, _) = ws_connect(&server, "web", port, "v4.channel.k8s.io")
        .await
        .unwrap();
    for _ in 0..12 {
        ws.send(Message::Ping(Default::default())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.port_forwards_idle_cut(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_errors_are_plain_text() {
    let (server, _pods) = setup().await;
    server.apply(pod("web", "127.0.0.1")).unwrap();
    server.set_unknown_to_kubelet("web", true);
    let (code, body) = refusal(
        ws_connect(&server, "web", 80, "v4.channel.k8s.io")
            .await
            .unwrap_err(),
    );
    assert_eq!((code, body.trim()), (404, "pod does not exist"));
    // The API server's own 404 is a JSON Status.
    let (code, body) = refusal(
        ws_connect(&server, "nope", 80, "v4.channel.k8s.io")
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
    assert!(body.contains("\"kind\":\"Status\""), "{body}");
}

/// A WebSocket port-forward of pod web is refused for want of `verb`.
async fn forbidden_as(server: &TestApiServer, port: u16, verb: &str) {
    let (code, body) = refusal(
        ws_connect(server, "web", port, "v4.channel.k8s.io")
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    let cause = format!("cannot {verb} resource \\\"pods/portforward\\\"");
    assert!(body.contains(&cause), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_port_forward_is_authorised_as_get_then_also_create_from_1_35() {
    let (server, _pods) = setup().await;
    server.apply(pod("web", "127.0.0.1")).unwrap();
    let port = echo().await;
    // A role written for kubectl's SPDY: create only.
    server.set_role(Some(&[
        ("pods", &["get", "list"][..]),
        ("pods/portforward", &["create"][..]),
    ]));
    forbidden_as(&server, port, "get").await;
    // get only: enough before 1.35.
    server.set_role(Some(&[("pods/portforward", &["get"][..])]));
    ws_connect(&server, "web", port, "v4.channel.k8s.io")
        .await
        .unwrap();
    // 1.35: create is checked as well.
    server.set_websocket_create_check(true);
    forbidden_as(&server, port, "create").await;
    server.set_role(Some(&[("pods/portforward", &["get", "create"][..])]));
    ws_connect(&server, "web", port, "v4.channel.k8s.io")
        .await
        .unwrap();
}
