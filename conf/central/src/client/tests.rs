//! The client: URLs, paths, errors, and requests against canned answers on loopback.

use super::*;
use conf::api::{ATTACHMENT, CLUSTER_NETWORK, NAD};
use serde_json::json;

#[test]
fn paths_follow_kubernetes_layout() {
    assert_eq!(
        object_path(&NAD, Some("red"), "data"),
        "/apis/k8s.cni.cncf.io/v1/namespaces/red/network-attachment-definitions/data"
    );
    assert_eq!(
        collection_path(&ATTACHMENT, None),
        "/apis/plexus.io/v1/attachments"
    );
    assert_eq!(
        object_path(&CLUSTER_NETWORK, Some("ignored"), "n"),
        "/apis/plexus.io/v1/clusternetworks/n"
    );
    assert_eq!(encode("plexus.io/node=n1"), "plexus.io%2Fnode%3Dn1");
}

#[test]
fn urls() {
    let c = Client::new("http://127.0.0.1:8080/", Some("t"), None).expect("http");
    assert_eq!(
        (c.host.as_str(), c.port, c.base.as_str()),
        ("127.0.0.1", 8080, "")
    );
    let c = Client::new("http://[::1]/prefix/", None, None).expect("v6");
    assert_eq!(
        (c.host.as_str(), c.port, c.base.as_str()),
        ("::1", 80, "/prefix")
    );
    assert_eq!(c.authority, "[::1]");
    for bad in ["ftp://x", "localhost:80", "https://x:443", "http://u@x/"] {
        assert!(Client::new(bad, None, None).is_err(), "{bad}");
    }
}

/// Serves one canned response on loopback; yields the request it read.
async fn serve_once(response: String) -> (String, tokio::task::JoinHandle<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.expect("read");
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.parse().expect("length"));
                if body.len() >= len || n == 0 {
                    break;
                }
            }
        }
        if response.is_empty() {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        s.write_all(response.as_bytes()).await.expect("write");
        String::from_utf8_lossy(&req).to_string()
    });
    (url, task)
}

#[tokio::test]
async fn round_trips() {
    let reply = |status: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let created = reply("201 Created", r#"{"metadata":{"name":"p1"}}"#);
    let (url, task) = serve_once(created).await;
    let c = Client::new(&format!("{url}/base"), Some("t0k"), None).expect("client");
    let obj = json!({"metadata": {"name": "p1"}});
    let got = c.create(&IP_POOL, None, &obj).await.expect("create");
    assert_eq!(got, obj);
    let req = task.await.expect("server");
    assert!(
        req.starts_with("POST /base/apis/plexus.io/v1/ippools HTTP/1.1\r\n"),
        "{req}"
    );
    assert!(req.contains("authorization: Bearer t0k\r\n"), "{req}");
    assert!(req.contains("content-type: application/json\r\n"), "{req}");
    assert!(req.ends_with(r#"{"metadata":{"name":"p1"}}"#), "{req}");

    let status = r#"{"kind":"Status","reason":"Conflict","message":"stale","code":409}"#;
    let conflict = reply("409 Conflict", status);
    let (url, task) = serve_once(conflict).await;
    let c = Client::new(&url, None, None).expect("client");
    let e = c
        .list(&ATTACHMENT, Some("red"), Some("plexus.io/node=n1"))
        .await;
    let e = e.expect_err("409");
    assert_eq!(e.to_string(), "409 Conflict: stale");
    let req = task.await.expect("server");
    assert!(req.starts_with(
        "GET /apis/plexus.io/v1/namespaces/red/attachments?labelSelector=plexus.io%2Fnode%3Dn1 "
    ));
    assert!(!req.contains("authorization"), "{req}");
}

#[tokio::test]
async fn times_out() {
    let (url, task) = serve_once(String::new()).await;
    let c = Client::new(&url, None, None)
        .expect("client")
        .with_timeouts(Duration::from_secs(1), Duration::from_millis(200));
    let e = c.get(&NAD, Some("x"), "y").await.expect_err("timeout");
    assert!(
        matches!(
            e,
            Error::Timeout {
                what: "request",
                ..
            }
        ),
        "{e}"
    );
    task.abort();
}

#[test]
fn api_errors() {
    let body = br#"{"kind":"Status","status":"Failure","message":"bad config","reason":"Invalid","code":422,
        "details":{"causes":[{"reason":"FieldValueInvalid","message":"not JSON","field":"spec.config"}]}}"#;
    let e = ApiError::from_response(422, body);
    assert_eq!(e.to_string(), "422 Invalid: bad config");
    assert_eq!(e.causes(), vec![("spec.config".into(), "not JSON".into())]);
    let e = ApiError::from_response(502, b"");
    assert_eq!(e.to_string(), "502 Bad Gateway: Bad Gateway");
    let e = ApiError::from_response(500, b"boom\n");
    assert_eq!(
        (e.reason().as_str(), e.message()),
        ("Internal Server Error", "boom")
    );
    assert!(Error::Api(ApiError::from_response(404, b"{}")).is_not_found());
}
