//! The CSI Identity service.

use leasehold_proto::csi::v1 as csi;
use tonic::{Request, Response, Status};

/// The driver name registered with the kubelet.
pub const DRIVER_NAME: &str = "csi.leasehold.dev";

/// Identity: name, version, and the driver's own health.
///
/// `Probe` answers for this process only. The chart's livenessprobe sidecar turns
/// `Probe` into the container's liveness check, so reporting the broker's
/// reachability here would let a controller outage restart every node driver (and
/// kill their in-flight unpublishes and renewals). The broker's reachability is
/// shown by the driver's `/readyz` and its metrics instead.
#[derive(Debug, Clone, Default)]
pub struct IdentityService {}

impl IdentityService {
    /// The Identity service.
    pub fn new() -> Self {
        Self {}
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // Node-only driver: no controller service, no topology.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Answering at all proves the server loop runs; the driver has nothing
        // else to initialise before it can serve.
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
