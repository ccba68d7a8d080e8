//! The CSI Identity service.

use std::sync::Arc;

use leasehold_proto::csi::v1 as csi;
use tonic::{Request, Response, Status};

use crate::broker::CredentialBroker;

/// The driver name registered with the kubelet.
pub const DRIVER_NAME: &str = "csi.leasehold.dev";

/// Identity: name, version, and readiness (the broker is reachable).
#[derive(Clone)]
pub struct IdentityService {
    broker: Arc<dyn CredentialBroker>,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService").finish_non_exhaustive()
    }
}

impl IdentityService {
    /// Readiness follows `broker.ready()`.
    pub fn new(broker: Arc<dyn CredentialBroker>) -> Self {
        Self { broker }
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
        let ready = self.broker.ready().await;
        if !ready {
            tracing::debug!("probe: broker not reachable");
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
