//! A gRPC client of the coordinator that sends the shared token with every call.

use anyhow::{Context, Result};
use stackwise_proto::AUTH_HEADER;
use stackwise_proto::pb::coordinator_client::CoordinatorClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Clone)]
pub struct AddToken {
    value: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.value {
            req.metadata_mut().insert(AUTH_HEADER, v.clone());
        }
        Ok(req)
    }
}

pub type Client = CoordinatorClient<InterceptedService<Channel, AddToken>>;

/// How to reach the coordinator.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the coordinator's certificate, for `https://`.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Target {
    /// The token from `--token-file`, else `STACKWISE_TOKEN`.
    pub fn token_from(file: Option<&std::path::Path>) -> Result<Option<String>> {
        if let Some(f) = file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("read token file {}", f.display()))?;
            return Ok(Some(t.trim().to_string()));
        }
        Ok(std::env::var("STACKWISE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()))
    }

    pub async fn connect(&self) -> Result<Client> {
        stackwise_proto::install_tls_provider();
        let mut ep = Endpoint::from_shared(self.url.clone())
            .with_context(|| format!("coordinator address {:?}", self.url))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .http2_keep_alive_interval(std::time::Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if self.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.tls_ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("read CA certificate {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).context("TLS configuration")?;
        }
        let channel = ep
            .connect()
            .await
            .with_context(|| format!("connect to the coordinator at {}", self.url))?;
        let value = match &self.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("the token must be printable ASCII")?,
            ),
            None => None,
        };
        Ok(CoordinatorClient::with_interceptor(
            channel,
            AddToken { value },
        ))
    }
}
