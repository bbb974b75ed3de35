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
        let (token, from) = match file {
            Some(f) => (
                std::fs::read_to_string(f)
                    .with_context(|| format!("read token file {}", f.display()))?,
                format!("the token file {}", f.display()),
            ),
            None => match std::env::var("STACKWISE_TOKEN") {
                Ok(t) => (t, "STACKWISE_TOKEN".to_string()),
                Err(_) => return Ok(None),
            },
        };
        let token = token.trim();
        if token.is_empty() {
            anyhow::bail!(
                "{from} is empty (or only whitespace), which would turn authentication off; put a random secret in it, \
                 e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > token`"
            );
        }
        Ok(Some(token.to_string()))
    }

    pub async fn connect(&self) -> Result<Client> {
        stackwise_proto::install_tls_provider();
        let mut ep = Endpoint::from_shared(self.url.clone())
            .with_context(|| format!("coordinator address {:?}", self.url))?
            .connect_timeout(std::time::Duration::from_secs(5))
            // Every call must be answered within this (a session: once the coordinator
            // has read the hello; the stream itself may last as long as the job).
            .timeout(std::time::Duration::from_secs(30))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_blank_token_file_is_refused_and_a_real_one_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        for blank in ["", "  \n\t"] {
            std::fs::write(&f, blank).unwrap();
            let e = Target::token_from(Some(&f)).unwrap_err().to_string();
            assert!(
                e.contains("is empty") && e.contains("authentication off"),
                "{e}"
            );
        }
        std::fs::write(&f, " s3cret\n").unwrap();
        assert_eq!(
            Target::token_from(Some(&f)).unwrap().as_deref(),
            Some("s3cret")
        );
    }
}
