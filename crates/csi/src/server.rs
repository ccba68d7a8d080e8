//! The gRPC server on a Unix socket.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use leasehold_proto::csi::v1::identity_server::IdentityServer;
use leasehold_proto::csi::v1::node_server::NodeServer;
use tokio_stream::wrappers::UnixListenerStream;

use crate::identity::IdentityService;
use crate::node::NodeService;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Preparing or binding the socket failed.
    #[error("socket {}: {op}", path.display())]
    Socket {
        /// What we were doing.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server")]
    Transport(#[source] tonic::transport::Error),
    /// Opening the state directory failed.
    #[error("state directory")]
    State(#[source] crate::state::StateError),
}

fn socket_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ServeError + 'a {
    move |source| ServeError::Socket {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Binds a Unix socket at `path` with mode 0600.
///
/// The socket is bound inside a fresh 0700 directory next to `path`, set to
/// 0600, and only then renamed into place, so it is never reachable with
/// looser permissions (no process-wide umask change). A stale socket at
/// `path` is removed; any other kind of file there is an error.
pub fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(socket_err("remove stale socket", path))?;
        }
        Ok(_) => {
            return Err(ServeError::Socket {
                op: "refusing to replace a non-socket file",
                path: path.to_path_buf(),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err("stat", path)(e)),
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path.file_name().ok_or_else(|| {
        socket_err("no file name", path)(io::Error::from(io::ErrorKind::InvalidInput))
    })?;
    let private = parent.join(format!(
        ".{}.bind-{:08x}",
        file_name.to_string_lossy(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(socket_err("create private bind directory", path))?;
    let staged = private.join("s");
    let result = (|| {
        let listener =
            std::os::unix::net::UnixListener::bind(&staged).map_err(socket_err("bind", path))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err("chmod 0600", path))?;
        std::fs::rename(&staged, path).map_err(socket_err("move into place", path))?;
        listener
            .set_nonblocking(true)
            .map_err(socket_err("set non-blocking", path))?;
        tokio::net::UnixListener::from_std(listener).map_err(socket_err("register", path))
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result
}

/// Serves Identity and Node on `socket_path` until `shutdown` completes,
/// then drains in-flight calls and removes the socket.
pub async fn serve(
    socket_path: &Path,
    identity: IdentityService,
    node: NodeService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = bind_socket(socket_path)?;
    tracing::info!(socket = %socket_path.display(), "CSI node driver listening");
    let result = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Transport);
    let _ = std::fs::remove_file(socket_path);
    tracing::info!("CSI node driver stopped");
    result
}
