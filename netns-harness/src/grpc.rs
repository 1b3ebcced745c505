//! gRPC over a unix socket, as the fixtures' clients (containerd's CRI,
//! kubelet's device plugin calls) dial it.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// `endpoint` (its settings; its URI only satisfies the builder) dialled
/// on the unix socket `socket`.
pub async fn unix_channel(
    endpoint: Endpoint,
    socket: &Path,
) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
}
