//! An HTTPS client of plexusd (and of any Kubernetes-style API server).
//!
//! One HTTP/1.1 connection per request: plain TCP for `http://`, rustls for
//! `https://` (the server name is the URL's host, IP literals included).
//! Non-2xx answers become [`ApiError`]s holding the server's `Status` object.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use conf::api::{Kind, IP_POOL};

mod error;
#[cfg(test)]
mod tests;

pub use error::{ApiError, Error};
pub use hyper::Method;

/// How long connecting (TCP and TLS) and a whole request may take, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest response body read.
const MAX_BODY: usize = 64 << 20;

/// A raw answer: status and body, whatever the status.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    /// The body as JSON (`null` when empty).
    pub fn json(&self) -> Result<Value, Error> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| Error::Decode(e.to_string()))
    }
}

/// A client of one server, with an optional bearer token.
#[derive(Clone)]
pub struct Client {
    url: String,
    /// `host:port` as the URL gave it, for the Host header.
    authority: String,
    /// The host without IPv6 brackets, for connecting and TLS.
    host: String,
    port: u16,
    /// Path prefix of the URL, without a trailing slash.
    base: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    token: Option<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Client {
    /// A client of `server` (`http://` or `https://host[:port][/prefix]`); https needs `ca` (ignored for http).
    pub fn new(server: &str, token: Option<&str>, ca: Option<&Path>) -> Result<Client, Error> {
        let https = server
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        let tls = match ca.filter(|_| https) {
            Some(ca) => Some(crate::tls::client_config(ca).map_err(Error::Config)?),
            None => None,
        };
        Client::with_tls(server, token, tls)
    }

    /// Like [`Client::new`], with a TLS configuration the caller built.
    pub fn with_tls(
        server: &str,
        token: Option<&str>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, Error> {
        let bad = |why: &str| Error::Config(format!("server URL {server:?}: {why}"));
        let uri: Uri = server.parse().map_err(|e| bad(&format!("{e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("must start with http:// or https://")),
        };
        let auth = uri.authority().ok_or_else(|| bad("no host"))?;
        if auth.as_str().contains('@') {
            return Err(bad("user information is not supported"));
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
        if uri.query().is_some() {
            return Err(bad("a query is not allowed"));
        }
        let tls = if https {
            let config = tls.ok_or_else(|| {
                Error::Config(format!(
                    "{server}: https needs a certificate authority file"
                ))
            })?;
            let mut config = (*config).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = match host.parse::<IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(host.to_string())
                    .map_err(|_| bad("host is not a valid TLS server name"))?,
            };
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Client {
            url: server.trim_end_matches('/').to_string(),
            authority: auth.as_str().to_string(),
            host: host.to_string(),
            port,
            base: uri.path().trim_end_matches('/').to_string(),
            tls,
            token: token.filter(|t| !t.is_empty()).map(str::to_string),
            connect_timeout: DEFAULT_TIMEOUT,
            request_timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same client with another bearer token (or none).
    pub fn with_token(mut self, token: Option<&str>) -> Client {
        self.token = token.filter(|t| !t.is_empty()).map(str::to_string);
        self
    }

    /// The same client with other connect and request timeouts.
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> Client {
        self.connect_timeout = connect;
        self.request_timeout = request;
        self
    }

    /// The server URL, without a trailing slash.
    pub fn server(&self) -> &str {
        &self.url
    }

    fn addr(&self) -> String {
        match self.host.contains(':') {
            true => format!("[{}]:{}", self.host, self.port),
            false => format!("{}:{}", self.host, self.port),
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<hyper::Request<Full<Bytes>>, Error> {
        let uri = format!("{}{path}", self.base);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&uri)
            .header(HOST, &self.authority)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("plexusctl/", env!("CARGO_PKG_VERSION")));
        let body = match body {
            Some((content_type, bytes)) => {
                req = req.header(CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        req.body(Full::new(body))
            .map_err(|e| Error::Config(format!("request {uri}: {e}")))
    }

    /// Sends one request (`path` absolute, with any query; the body with its
    /// content type) on a connection of its own and returns the answer as is.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<Response, Error> {
        let addr = self.addr();
        let req = self.request(method, path, body)?;
        let timed_out = |what| Error::Timeout {
            what,
            addr: addr.clone(),
            after: self.request_timeout,
        };
        tokio::time::timeout(self.request_timeout, async {
            let mut sender = self.handshake(&addr).await?;
            exchange(&mut sender, req, &addr).await
        })
        .await
        .map_err(|_| timed_out("request"))?
    }

    /// A kept-alive connection for many requests in turn.
    pub async fn session(&self) -> Result<Session, Error> {
        let addr = self.addr();
        let sender = self.handshake(&addr).await?;
        Ok(Session {
            client: self.clone(),
            sender,
            addr,
        })
    }

    async fn handshake(&self, addr: &str) -> Result<Sender, Error> {
        let connect = async {
            let fail = |e: std::io::Error| Error::Connect {
                addr: addr.to_string(),
                reason: e.to_string(),
            };
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(fail)?;
            // Requests are small: don't let Nagle hold them back.
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok(Stream::Plain(tcp)),
                Some((connector, name)) => connector
                    .connect(name.clone(), tcp)
                    .await
                    .map(|s| Stream::Tls(Box::new(s)))
                    .map_err(|e| Error::Connect {
                        addr: addr.to_string(),
                        reason: format!("TLS handshake: {e}"),
                    }),
            }
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| Error::Timeout {
                what: "connect",
                addr: addr.to_string(),
                after: self.connect_timeout,
            })??;
        match stream {
            Stream::Plain(s) => open(s, addr).await,
            Stream::Tls(s) => open(*s, addr).await,
        }
    }

    /// Sends JSON (or nothing) and returns the JSON answer; non-2xx is [`Error::Api`].
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        self.json(method, path, "application/json", body).await
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let body = match body {
            Some(v) => {
                let bytes = serde_json::to_vec(v)
                    .map_err(|e| Error::Config(format!("encode body: {e}")))?;
                Some((content_type, Bytes::from(bytes)))
            }
            None => None,
        };
        let resp = self.send(method, path, body).await?;
        if !(200..300).contains(&resp.status) {
            return Err(ApiError::from_response(resp.status, &resp.body).into());
        }
        resp.json()
    }

    /// Reads one object.
    pub async fn get(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        self.raw(Method::GET, &object_path(kind, namespace, name), None)
            .await
    }

    /// Lists a kind (in `namespace`, or everywhere when `None`), optionally by label selector.
    pub async fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        label_selector: Option<&str>,
    ) -> Result<Value, Error> {
        let mut path = collection_path(kind, namespace);
        if let Some(s) = label_selector.filter(|s| !s.is_empty()) {
            path = format!("{path}?labelSelector={}", encode(s));
        }
        self.raw(Method::GET, &path, None).await
    }

    /// Creates an object (POST to its collection); returns the stored object.
    pub async fn create(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        object: &Value,
    ) -> Result<Value, Error> {
        self.raw(
            Method::POST,
            &collection_path(kind, namespace),
            Some(object),
        )
        .await
    }

    /// Replaces an object (PUT; `metadata.resourceVersion` must be current).
    pub async fn update(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        object: &Value,
    ) -> Result<Value, Error> {
        self.raw(
            Method::PUT,
            &object_path(kind, namespace, name),
            Some(object),
        )
        .await
    }

    /// Changes an object by JSON merge patch (RFC 7386); returns the stored object.
    pub async fn patch(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, Error> {
        let path = object_path(kind, namespace, name);
        self.json(
            Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(patch),
        )
        .await
    }

    /// Deletes an object; returns the deleted object or a `Status`.
    pub async fn delete(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        self.raw(Method::DELETE, &object_path(kind, namespace, name), None)
            .await
    }

    /// A pool's `IPPoolUsage`: blocks per node, addresses in use, size and free.
    pub async fn pool_usage(&self, pool: &str) -> Result<Value, Error> {
        let path = format!("{}/usage", object_path(&IP_POOL, None, pool));
        self.raw(Method::GET, &path, None).await
    }
}

/// The collection URL path of a kind (a namespace's, or all namespaces' when `None`).
pub fn collection_path(kind: &Kind, namespace: Option<&str>) -> String {
    match namespace.filter(|_| kind.namespaced) {
        Some(ns) => format!(
            "/apis/{}/{}/namespaces/{}/{}",
            kind.group,
            kind.version,
            encode(ns),
            kind.plural
        ),
        None => format!("/apis/{}/{}/{}", kind.group, kind.version, kind.plural),
    }
}

/// The URL path of one object.
pub fn object_path(kind: &Kind, namespace: Option<&str>, name: &str) -> String {
    format!("{}/{}", collection_path(kind, namespace), encode(name))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One kept-alive connection of a [`Client`].
pub struct Session {
    client: Client,
    sender: Sender,
    addr: String,
}

impl Session {
    /// Sends one request on this connection and returns the answer as is.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<Response, Error> {
        let req = self.client.request(method, path, body)?;
        let after = self.client.request_timeout;
        tokio::time::timeout(after, exchange(&mut self.sender, req, &self.addr))
            .await
            .map_err(|_| Error::Timeout {
                what: "request",
                addr: self.addr.clone(),
                after,
            })?
    }
}

async fn open<S>(io: S, addr: &str) -> Result<Sender, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Error::Http(format!("HTTP handshake with {addr}: {e}")))?;
    // The connection task ends once the sender is dropped.
    tokio::spawn(conn);
    Ok(sender)
}

async fn exchange(
    sender: &mut Sender,
    req: hyper::Request<Full<Bytes>>,
    addr: &str,
) -> Result<Response, Error> {
    let what = format!("{} {}", req.method(), req.uri());
    let fail = |e: &dyn std::fmt::Display| Error::Http(format!("{what} on {addr}: {e}"));
    sender.ready().await.map_err(|e| fail(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| fail(&e))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes();
    Ok(Response { status, body })
}
