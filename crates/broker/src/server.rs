//! Serving the broker over TLS.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::debug;

use crate::limits::BrokerLimits;
use crate::service::BrokerService;
use crate::tls::{BrokerTls, TlsError};

/// How the broker treats connections. Every open connection holds one of
/// `max_connections` slots, so a peer that vanished (a lost node, a killed
/// driver) must not keep one: a connection is closed when it has not finished
/// the TLS handshake and sent its first HTTP/2 bytes within
/// `handshake_timeout`, or when it leaves an HTTP/2 PING (sent every
/// `keepalive_interval`) unanswered for `keepalive_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// Open connections, handshakes included; more are closed on accept.
    pub max_connections: usize,
    /// Longest from accept to the end of the TLS handshake and the client's
    /// first HTTP/2 bytes (its connection preface).
    pub handshake_timeout: Duration,
    /// How often each connection is probed with an HTTP/2 PING.
    pub keepalive_interval: Duration,
    /// How long the peer has to acknowledge a PING before its connection is closed.
    pub keepalive_timeout: Duration,
}

impl ConnectionSettings {
    /// Handshake deadline by default.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// PING interval by default.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    /// PING acknowledgement deadline by default: a dead peer's slot is free
    /// within about 50 s.
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

    /// The defaults with [`BrokerLimits::current`]`().max_connections`.
    pub fn current() -> Self {
        Self {
            max_connections: BrokerLimits::current().max_connections,
            handshake_timeout: Self::HANDSHAKE_TIMEOUT,
            keepalive_interval: Self::KEEPALIVE_INTERVAL,
            keepalive_timeout: Self::KEEPALIVE_TIMEOUT,
        }
    }

    /// The gRPC server with these keepalive settings.
    fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
    }
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the address failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The TLS configuration was refused.
    #[error("TLS configuration")]
    Tls(#[from] TlsError),
    /// The gRPC server failed.
    #[error("gRPC server")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `addr` and serves until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    tls: &BrokerTls,
    service: BrokerService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    serve_with_listener(listener, tls, service, shutdown).await
}

/// A connection holding one of the server's connection slots until dropped.
/// `head`: the client's first bytes, read during the handshake, handed to the
/// server before the rest of the stream.
struct Limited<S> {
    inner: S,
    head: Vec<u8>,
    head_read: usize,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.head_read < this.head.len() {
            let rest = &this.head[this.head_read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.head_read += n;
            if this.head_read == this.head.len() {
                this.head = Vec::new();
                this.head_read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Serves on a bound listener until `shutdown` completes, with
/// [`ConnectionSettings::current`].
pub async fn serve_with_listener(
    listener: TcpListener,
    tls: &BrokerTls,
    service: BrokerService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with_settings(
        listener,
        tls,
        service,
        ConnectionSettings::current(),
        shutdown,
    )
    .await
}

/// [`serve_with_settings`] with at most `max_connections` connections and the
/// default timeouts.
pub async fn serve_with_listener_limited(
    listener: TcpListener,
    tls: &BrokerTls,
    service: BrokerService,
    max_connections: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let settings = ConnectionSettings {
        max_connections,
        ..ConnectionSettings::current()
    };
    serve_with_settings(listener, tls, service, settings, shutdown).await
}

/// Serves on a bound listener until `shutdown` completes. Accepted
/// connections get `TCP_NODELAY` (without it, Nagle's algorithm and delayed
/// ACKs add about 40 ms to each call) and a TLS handshake (off the accept loop,
/// with a timeout that also covers the client's first bytes). At most
/// `settings.max_connections` are open (handshakes included); more are closed
/// as soon as they are accepted. Established connections are probed with
/// HTTP/2 PINGs and closed when the peer stops answering.
pub async fn serve_with_settings(
    listener: TcpListener,
    tls: &BrokerTls,
    service: BrokerService,
    settings: ConnectionSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let acceptor = TlsAcceptor::from(tls.server_config()?);
    let max_connections = settings.max_connections;
    let handshake_timeout = settings.handshake_timeout;
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Limited<TlsStream<TcpStream>>>>(64);
    let accept_loop = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // The server dropped the stream: stop accepting.
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Closed at once: the client retries (another replica, later).
                debug!(%peer, max_connections, "connection limit reached; closing");
                drop(stream);
                continue;
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                // The client's first bytes too: a peer that vanished right after
                // the TLS handshake would otherwise hold its slot forever (HTTP/2
                // PINGs start only once the connection preface has arrived).
                let handshake = async {
                    let mut tls = acceptor.accept(stream).await?;
                    let mut head = vec![0u8; 1024];
                    let n = tls.read(&mut head).await?;
                    if n == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                    }
                    head.truncate(n);
                    Ok((tls, head))
                };
                match tokio::time::timeout(handshake_timeout, handshake).await {
                    Ok(Ok((tls, head))) => {
                        let _ = tx
                            .send(Ok(Limited {
                                inner: tls,
                                head,
                                head_read: 0,
                                _permit: permit,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    let result = settings
        .server()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    accept_loop.abort();
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The installed server probes every connection and closes a silent one
    /// well within the kubelet's 2-minute call budget.
    #[test]
    fn dead_peers_are_detected_by_default() {
        let settings = ConnectionSettings::current();
        assert_eq!(
            settings.max_connections,
            BrokerLimits::current().max_connections
        );
        assert!(settings.keepalive_interval > Duration::ZERO);
        assert!(settings.keepalive_timeout > Duration::ZERO);
        assert!(
            settings.handshake_timeout + settings.keepalive_interval + settings.keepalive_timeout
                < Duration::from_secs(120)
        );
    }
}
