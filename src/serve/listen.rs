//! The accept loop: HTTP/1.1 connections served by hyper with a header-read timeout (which also
//! closes keep-alive connections idle longer than it) and a cap on open connections, so neither
//! trickling nor idle clients can hold the server. A connection over the cap is answered 503 in
//! the API's JSON shape and closed. On shutdown: stop accepting, ask every connection to finish
//! its request and close, and wait for them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
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
            let conn = builder.serve_connection(TokioIo::new(stream), service);
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
