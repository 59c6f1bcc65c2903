//! The accept loop: HTTP/1.1 connections served by hyper with a header-read timeout (which also
//! closes keep-alive connections idle longer than it) and a cap on open connections, so neither
//! trickling nor idle clients can hold the server. A connection over the cap is answered 503 in
//! the API's JSON shape and closed. On shutdown: stop accepting, ask every connection to finish
//! its request and close, and wait for them. Requests hyper itself rejects before any handler
//! sees them (malformed, headers too large, URI too long) get the same JSON error shape too
//! ([`JsonRejections`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{watch, Semaphore};

#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A request's headers must arrive within this; an idle keep-alive connection closes after it.
    pub header_timeout: Duration,
    /// Most open connections.
    pub max_connections: usize,
}

/// Serve `router` on `listener` until `shutdown` completes, then let open connections finish.
pub async fn serve_connections(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing_tx, closing_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                // Out of descriptors or a connection reset before accept: keep serving.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(JsonRejections::new(stream)), service);
            tokio::pin!(conn);
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    changed = closing.changed() => {
                        conn.as_mut().graceful_shutdown();
                        if changed.is_err() {
                            // The loop is gone; finish this connection without listening again.
                            let _ = conn.as_mut().await;
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection holds a slot until it ends.
    let _ = slots.acquire_many(limits.max_connections as u32).await;
    Ok(())
}

/// Answer a connection over the cap without reading it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let body = r#"{"error":{"message":"too many open connections, retry later","type":"rate_limit_error","param":null}}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// The connection's byte stream, with one rewrite: the bodiless error head hyper writes itself
/// when it cannot parse a request (400, 414, 431; no hook exists for it) is replaced by the same
/// status with a JSON error body, as every handler answers. hyper closes the connection after
/// such a head, so the added body cannot be mistaken for the next response. Our own responses
/// always carry a content type, which is how the two are told apart.
struct JsonRejections<S> {
    inner: S,
    /// Bytes of a replacement still to write, and how far it got.
    pending: Vec<u8>,
    written: usize,
}

impl<S> JsonRejections<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

/// The JSON response standing in for `head`, if `head` is hyper's own rejection.
fn json_rejection(head: &[u8]) -> Option<Vec<u8>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = std::str::from_utf8(&head[..end]).ok()?.to_ascii_lowercase();
    let status = text.strip_prefix("http/1.1 ")?.get(..3)?.to_string();
    let message = match status.as_str() {
        "400" => "malformed HTTP request",
        "414" => "request URI too long",
        "431" => "request headers too large or too many",
        _ => return None,
    };
    if text.contains("\r\ncontent-type:") || !text.contains("\r\ncontent-length: 0") {
        return None;
    }
    let kind = "invalid_request_error";
    let body = format!(r#"{{"error":{{"message":"{message}","type":"{kind}","param":null}}}}"#);
    let first = std::str::from_utf8(&head[..head.windows(2).position(|w| w == b"\r\n")?]).ok()?;
    Some(
        format!(
            "{first}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncWrite + Unpin> JsonRejections<S> {
    /// Write what is left of a replacement.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonRejections<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonRejections<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_empty() {
            // hyper hands a head over in one piece (no vectored writes here).
            if let Some(json) = buf
                .starts_with(b"HTTP/1.1 ")
                .then(|| json_rejection(buf))
                .flatten()
            {
                this.pending = json;
                this.written = 0;
            } else {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
        }
        // Everything hyper gave is consumed once its replacement is out.
        ready!(this.poll_pending(cx))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::json_rejection;

    #[test]
    fn only_hypers_bodiless_rejections_are_rewritten() {
        let hyper431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(json_rejection(hyper431).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(out.contains(&format!("content-length: {}\r\n", body.len())));
        // Our own JSON 400s, success heads and bodies pass untouched.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert!(json_rejection(ours).is_none());
        assert!(json_rejection(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(json_rejection(b"HTTP/1.1 400 partial head").is_none());
    }
}
