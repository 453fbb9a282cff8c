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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_with_the_close_signal_still_gets_the_reply() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let (server, _pods) = setup().await;
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
    let url = format!(
        "ws://{}/api/v1/namespaces/default/pods/web/portforward?ports={port}",
        server.addr()
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "v4.channel.k8s.io"
    );
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
