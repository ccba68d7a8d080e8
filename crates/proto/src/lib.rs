//! Generated gRPC code for leasehold.
//!
//! - [`csi::v1`]: the CSI v1 Identity and Node services (wire-compatible with the
//!   CSI specification; Controller services left out).
//! - [`broker::v1`]: leasehold's broker API between node drivers and the controller.
//!
//! Messages that carry secrets (`NodePublishVolumeRequest.volume_context` and
//! `secrets`, the broker's `pod_token` and `files`) have a hand-written `Debug`
//! that prints keys and lengths only.

#![forbid(unsafe_code)]

use std::fmt;

/// CSI v1.
pub mod csi {
    /// Package `csi.v1`.
    #[allow(
        clippy::all,
        clippy::pedantic,
        missing_debug_implementations,
        missing_docs
    )]
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// leasehold broker API.
pub mod broker {
    /// Package `leasehold.broker.v1`.
    #[allow(
        clippy::all,
        clippy::pedantic,
        missing_debug_implementations,
        missing_docs
    )]
    pub mod v1 {
        tonic::include_proto!("leasehold.broker.v1");
    }
}

/// The metadata key (lower case, as gRPC requires) for the node driver's token.
pub const AUTHORIZATION_METADATA: &str = "authorization";

/// Keys of a map, for `Debug` output that must not show the values.
struct Keys<'a, K, V>(&'a std::collections::HashMap<K, V>);

impl<K: fmt::Debug + Ord, V> fmt::Debug for Keys<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&K> = self.0.keys().collect();
        keys.sort();
        f.debug_set().entries(keys).finish()
    }
}

/// Stands for a secret value in `Debug` output.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0)
    }
}

impl fmt::Debug for csi::v1::NodePublishVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodePublishVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("publish_context", &Keys(&self.publish_context))
            .field("staging_target_path", &self.staging_target_path)
            .field("target_path", &self.target_path)
            .field("volume_capability", &self.volume_capability)
            .field("readonly", &self.readonly)
            .field("secrets", &Keys(&self.secrets))
            .field("volume_context", &Keys(&self.volume_context))
            .finish()
    }
}

impl fmt::Debug for csi::v1::NodeStageVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeStageVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("publish_context", &Keys(&self.publish_context))
            .field("staging_target_path", &self.staging_target_path)
            .field("volume_capability", &self.volume_capability)
            .field("secrets", &Keys(&self.secrets))
            .field("volume_context", &Keys(&self.volume_context))
            .finish()
    }
}

impl fmt::Debug for csi::v1::NodeExpandVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeExpandVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("volume_path", &self.volume_path)
            .field("capacity_range", &self.capacity_range)
            .field("staging_target_path", &self.staging_target_path)
            .field("volume_capability", &self.volume_capability)
            .field("secrets", &Keys(&self.secrets))
            .finish()
    }
}

impl fmt::Debug for broker::v1::IssueRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueRequest")
            .field("pod", &self.pod)
            .field("pod_token", &Redacted(self.pod_token.len()))
            .field("lease", &self.lease)
            .field("volume_id", &self.volume_id)
            .field("node_name", &self.node_name)
            .field("held_version", &self.held_version)
            .finish()
    }
}

impl fmt::Debug for broker::v1::IssueResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueResponse")
            .field("files", &Keys(&self.files))
            .field("version", &self.version)
            .field("expires_at", &self.expires_at)
            .field("renew_at", &self.renew_at)
            .field("certificate", &self.certificate)
            .finish()
    }
}

impl fmt::Debug for broker::v1::IssueCertificateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The CSR is public, but long: its length says enough in logs.
        f.debug_struct("IssueCertificateRequest")
            .field("pod", &self.pod)
            .field("pod_token", &Redacted(self.pod_token.len()))
            .field("lease", &self.lease)
            .field("volume_id", &self.volume_id)
            .field("node_name", &self.node_name)
            .field("csr_pem", &format_args!("<{} bytes>", self.csr_pem.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_carrying_messages_redact_debug() {
        let mut req = csi::v1::NodePublishVolumeRequest {
            volume_id: "csi-abc".into(),
            target_path: "/var/lib/kubelet/pods/x/volumes/y/mount".into(),
            readonly: true,
            ..Default::default()
        };
        req.volume_context.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".into(),
            "{\"leasehold\":{\"token\":\"eyJSECRET\"}}".into(),
        );
        req.secrets.insert("password".into(), "hunter2".into());
        let shown = format!("{req:?}");
        assert!(shown.contains("csi-abc") && shown.contains("serviceAccount.tokens"));
        assert!(
            !shown.contains("eyJSECRET") && !shown.contains("hunter2"),
            "{shown}"
        );

        let issue = broker::v1::IssueRequest {
            pod_token: "eyJPODTOKEN".into(),
            ..Default::default()
        };
        assert!(!format!("{issue:?}").contains("eyJPODTOKEN"));
        let csr = broker::v1::IssueCertificateRequest {
            pod_token: "eyJPODTOKEN".into(),
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            ..Default::default()
        };
        let shown = format!("{csr:?}");
        assert!(
            !shown.contains("eyJPODTOKEN") && !shown.contains("BEGIN"),
            "{shown}"
        );
        let mut resp = broker::v1::IssueResponse {
            version: 7,
            ..Default::default()
        };
        resp.files.insert("password".into(), b"p4ssw0rd".to_vec());
        let shown = format!("{resp:?}");
        assert!(
            shown.contains("password") && !shown.contains("p4ssw0rd"),
            "{shown}"
        );
    }

    #[test]
    fn csi_field_numbers_match_the_spec() {
        use prost::Message;
        // target_path = 4, readonly = 6: tag bytes (4 << 3 | 2) and (6 << 3 | 0).
        let req = csi::v1::NodePublishVolumeRequest {
            target_path: "t".into(),
            readonly: true,
            ..Default::default()
        };
        assert_eq!(req.encode_to_vec(), vec![0x22, 1, b't', 0x30, 1]);
        // volume_mount_group = 3 inside MountVolume.
        let mount = csi::v1::volume_capability::MountVolume {
            volume_mount_group: "g".into(),
            ..Default::default()
        };
        assert_eq!(mount.encode_to_vec(), vec![0x1a, 1, b'g']);
    }
}
