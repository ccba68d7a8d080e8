//! A key-encryption key in AWS KMS.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::Client;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyState};
use zeroize::Zeroizing;

use crate::local::LOCAL_KEY_ID_PREFIX;
use crate::{DataKey, EncryptionContext, EnvelopeError, KeyEncryptionKey, KeyKind};

/// Where the KMS key is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsSettings {
    /// Key id, key ARN, alias name (`alias/…`) or alias ARN.
    pub key_id: String,
    /// AWS region; `None` takes it from the environment (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// KMS endpoint URL (a VPC endpoint, or a test server); `None` for AWS's.
    pub endpoint_url: Option<String>,
    /// Timeouts and retries.
    pub timeouts: KmsTimeouts,
}

impl KmsSettings {
    /// Settings for `key_id` with the region from the environment, AWS's endpoint
    /// and default timeouts.
    pub fn new(key_id: impl Into<String>) -> Self {
        Self {
            key_id: key_id.into(),
            region: None,
            endpoint_url: None,
            timeouts: KmsTimeouts::default(),
        }
    }
}

impl Default for KmsSettings {
    fn default() -> Self {
        Self::new(String::new())
    }
}

/// Bounds on one KMS call, so an outage fails in seconds instead of hanging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsTimeouts {
    /// TCP and TLS connection setup.
    pub connect: Duration,
    /// One attempt (connect, send, read the answer).
    pub attempt: Duration,
    /// The whole call, retries included.
    pub operation: Duration,
    /// Attempts per call, the first included (retries use the SDK's standard
    /// jittered backoff, and only for transient failures).
    pub max_attempts: u32,
}

impl Default for KmsTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            attempt: Duration::from_secs(5),
            operation: Duration::from_secs(12),
            max_attempts: 3,
        }
    }
}

/// A KMS key wrapping data keys with GenerateDataKey and unwrapping them with
/// Decrypt, the encryption context passed along both times.
///
/// [`connect`](Self::connect) resolves the configured id (for example an alias)
/// to the key ARN with DescribeKey; that ARN is [`key_id`](KeyEncryptionKey::key_id).
/// Envelopes record the ARN that GenerateDataKey reports. The service account
/// needs `kms:DescribeKey`, `kms:GenerateDataKey` and `kms:Decrypt` on the key.
pub struct KmsKey {
    client: Client,
    configured_id: String,
    key_arn: String,
}

impl KmsKey {
    /// Connect with the default AWS credential chain (environment, web identity
    /// such as IRSA, container and instance metadata).
    pub async fn connect(settings: KmsSettings) -> Result<Self, EnvelopeError> {
        Self::connect_with(settings, aws_config::defaults(BehaviorVersion::latest())).await
    }

    /// Connect with a prepared AWS config loader (for example one with explicit
    /// credentials); region, endpoint, timeouts and retries come from `settings`.
    pub async fn connect_with(
        settings: KmsSettings,
        loader: aws_config::ConfigLoader,
    ) -> Result<Self, EnvelopeError> {
        let KmsSettings {
            key_id,
            region,
            endpoint_url,
            timeouts,
        } = settings;
        if key_id.is_empty() {
            return Err(EnvelopeError::KeyRefused {
                key_id,
                operation: "describe_key",
                detail: "no KMS key id configured".to_owned(),
            });
        }
        let mut loader = loader
            // rustls with ring, the provider the whole workspace uses.
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(timeouts.connect)
                    .operation_attempt_timeout(timeouts.attempt)
                    .operation_timeout(timeouts.operation)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(timeouts.max_attempts.max(1)));
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        if let Some(endpoint_url) = endpoint_url {
            loader = loader.endpoint_url(endpoint_url);
        }
        let client = Client::new(&loader.load().await);
        let described = client
            .describe_key()
            .key_id(&key_id)
            .send()
            .await
            .map_err(|e| classify(e, &key_id, "describe_key", None))?;
        let metadata = described.key_metadata();
        let key_arn = metadata
            .and_then(|m| m.arn())
            .map(str::to_owned)
            .ok_or_else(|| EnvelopeError::KeyRefused {
                key_id: key_id.clone(),
                operation: "describe_key",
                detail: "DescribeKey returned no key ARN".to_owned(),
            })?;
        if let Some(state) = metadata.and_then(|m| m.key_state())
            && *state != KeyState::Enabled
        {
            tracing::warn!(key_id = %key_id, key_arn = %key_arn, key_state = %state.as_str(),
                "the KMS key is not enabled: sealing and opening under it will be refused");
        }
        Ok(Self {
            client,
            configured_id: key_id,
            key_arn,
        })
    }

    /// The id as configured (an alias stays an alias).
    pub fn configured_key_id(&self) -> &str {
        &self.configured_id
    }
}

impl fmt::Debug for KmsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsKey")
            .field("configured_key_id", &self.configured_id)
            .field("key_arn", &self.key_arn)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyEncryptionKey for KmsKey {
    fn key_id(&self) -> &str {
        &self.key_arn
    }

    async fn generate_data_key(
        &self,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, Vec<u8>), EnvelopeError> {
        // The configured id, so that retargeting an alias takes effect for new writes.
        let mut out = self
            .client
            .generate_data_key()
            .key_id(&self.configured_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(kms_context(ctx))
            .send()
            .await
            .map_err(|e| classify(e, &self.configured_id, "generate_data_key", Some(ctx)))?;
        let key_id = out.key_id.take().unwrap_or_else(|| self.key_arn.clone());
        let plaintext = Zeroizing::new(
            out.plaintext
                .take()
                .map(Blob::into_inner)
                .unwrap_or_default(),
        );
        let wrapped = out
            .ciphertext_blob
            .take()
            .map(Blob::into_inner)
            .ok_or_else(|| EnvelopeError::KeyRefused {
                key_id: key_id.clone(),
                operation: "generate_data_key",
                detail: "GenerateDataKey returned no ciphertext".to_owned(),
            })?;
        let data_key = DataKey::from_slice(&plaintext, key_id)?;
        Ok((data_key, wrapped))
    }

    async fn decrypt_data_key(
        &self,
        key_id: &str,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<DataKey, EnvelopeError> {
        let mut out = self
            .client
            .decrypt()
            .key_id(key_id)
            .ciphertext_blob(Blob::new(wrapped))
            .set_encryption_context(kms_context(ctx))
            .send()
            .await
            .map_err(|e| classify(e, key_id, "decrypt", Some(ctx)))?;
        let plaintext = Zeroizing::new(
            out.plaintext
                .take()
                .map(Blob::into_inner)
                .unwrap_or_default(),
        );
        let reported = out.key_id.take().unwrap_or_else(|| key_id.to_owned());
        DataKey::from_slice(&plaintext, reported)
    }

    fn can_decrypt(&self, key_id: &str) -> bool {
        // KMS decides whether this principal may use another KMS key.
        !key_id.starts_with(LOCAL_KEY_ID_PREFIX)
    }

    fn kind(&self) -> KeyKind {
        KeyKind::Kms
    }
}

fn kms_context(ctx: &EncryptionContext) -> Option<std::collections::HashMap<String, String>> {
    (!ctx.entries().is_empty()).then(|| ctx.to_kms_map())
}

/// Sort a KMS client error into what the operator should do about it.
fn classify<E>(
    err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
    key_id: &str,
    operation: &'static str,
    ctx: Option<&EncryptionContext>,
) -> EnvelopeError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let key_id = key_id.to_owned();
    let unavailable = |detail: String| EnvelopeError::KeyUnavailable {
        key_id: key_id.clone(),
        operation,
        detail,
    };
    let refused = |detail: String| EnvelopeError::KeyRefused {
        key_id: key_id.clone(),
        operation,
        detail,
    };
    match &err {
        SdkError::TimeoutError(_) => {
            unavailable(format!("timed out: {}", DisplayErrorContext(&err)))
        }
        SdkError::ResponseError(_) => unavailable(DisplayErrorContext(&err).to_string()),
        SdkError::DispatchFailure(failure) if failure.is_user() => {
            refused(DisplayErrorContext(&err).to_string())
        }
        SdkError::DispatchFailure(_) => unavailable(DisplayErrorContext(&err).to_string()),
        SdkError::ServiceError(service) => {
            let code = err.code().unwrap_or("Unknown");
            let detail = format!("{code}: {}", err.message().unwrap_or("no message"));
            let status = service.raw().status().as_u16();
            match code {
                "InvalidCiphertextException" | "IncorrectKeyException" => EnvelopeError::Tampered {
                    key_id,
                    context_keys: ctx
                        .map_or_else(|| "(none)".to_owned(), EncryptionContext::key_names),
                },
                "ThrottlingException"
                | "KeyUnavailableException"
                | "DependencyTimeoutException"
                | "KMSInternalException"
                | "InternalFailure"
                | "ServiceUnavailable"
                | "ServiceUnavailableException"
                | "RequestTimeout"
                | "RequestTimeoutException"
                | "ExpiredTokenException" => unavailable(detail),
                _ if status >= 500 || status == 429 => unavailable(detail),
                // Disabled, KMSInvalidState (pending deletion), NotFound,
                // AccessDenied, InvalidKeyUsage, bad credentials and the like.
                _ => refused(detail),
            }
        }
        // Construction failures (no region, no credentials) need configuration.
        _ => refused(DisplayErrorContext(&err).to_string()),
    }
}
