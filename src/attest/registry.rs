//! The one list of attestation methods: format name → verifier. Every
//! built-in is constructed here from [`AttestConfig`]; a format that is not
//! configured is not registered, so requests for it fail with
//! [`AttestError::UnknownFormat`] rather than reaching a half-set-up verifier.

use std::{collections::BTreeMap, sync::Arc};

use super::{
    nitro::{NitroAttestor, NitroConfig},
    oidc::{OidcAttestor, OidcIssuer},
    AttestError, Attestor,
};

/// Which verifiers to build, and with what trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestConfig {
    /// `aws_nitro`: `None` disables it.
    pub nitro: Option<NitroConfig>,
    /// `oidc`: enabled when at least one issuer is listed.
    pub oidc: Vec<OidcIssuer>,
}

impl Default for AttestConfig {
    /// Nitro enabled with the shipped AWS Nitro Enclaves Root G1; no OIDC issuer.
    fn default() -> Self {
        Self {
            nitro: Some(NitroConfig::default()),
            oidc: Vec::new(),
        }
    }
}

/// Format name → verifier, built once at startup.
#[derive(Clone)]
pub struct Registry {
    attestors: BTreeMap<&'static str, Arc<dyn Attestor>>,
    oidc: Option<Arc<OidcAttestor>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("formats", &self.formats())
            .finish()
    }
}

impl Registry {
    /// Builds every configured verifier.
    ///
    /// # Errors
    /// [`AttestError::Config`] when a verifier's configuration is unusable
    /// (bad roots, bad issuer, JWKS without a usable key, …).
    pub fn new(cfg: &AttestConfig) -> Result<Registry, AttestError> {
        let mut attestors: BTreeMap<&'static str, Arc<dyn Attestor>> = BTreeMap::new();
        let mut add = |a: Arc<dyn Attestor>| attestors.insert(a.format(), a);
        if let Some(nitro) = &cfg.nitro {
            add(Arc::new(NitroAttestor::new(nitro)?));
        }
        let mut oidc = None;
        if !cfg.oidc.is_empty() {
            let o = Arc::new(OidcAttestor::new(&cfg.oidc)?);
            oidc = Some(o.clone());
            add(o);
        }
        Ok(Self { attestors, oidc })
    }

    /// The verifier for `format`.
    ///
    /// # Errors
    /// [`AttestError::UnknownFormat`] when no such verifier is configured.
    pub fn get(&self, format: &str) -> Result<&dyn Attestor, AttestError> {
        self.attestors
            .get(format)
            .map(|a| a.as_ref())
            .ok_or_else(|| AttestError::UnknownFormat(super::quoted(format)))
    }

    /// The OIDC verifier, to refresh issuers' keys.
    pub fn oidc(&self) -> Option<&Arc<OidcAttestor>> {
        self.oidc.as_ref()
    }

    /// The configured format names, sorted.
    pub fn formats(&self) -> Vec<&'static str> {
        self.attestors.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::{
        testing::{test_csr, NitroPki, OidcTestIssuer, Opt, NOW_MS},
        AttestInput, Preset,
    };

    #[test]
    fn default_registry_has_nitro_with_the_aws_root_only() {
        let r = Registry::new(&AttestConfig::default()).unwrap();
        assert_eq!(r.formats(), ["aws_nitro"]);
        assert_eq!(r.get("aws_nitro").unwrap().format(), "aws_nitro");
        assert!(matches!(r.get("oidc"), Err(AttestError::UnknownFormat(_))));
        assert!(matches!(
            r.get("join_token"),
            Err(AttestError::UnknownFormat(_))
        ));
    }

    #[test]
    fn empty_config_registers_nothing() {
        let r = Registry::new(&AttestConfig {
            nitro: None,
            oidc: vec![],
        })
        .unwrap();
        assert!(r.formats().is_empty());
    }

    #[test]
    fn both_methods_dispatch() {
        let pki = NitroPki::new();
        let gh = OidcTestIssuer::ec("gh", "https://token.actions.githubusercontent.com");
        let r = Registry::new(&AttestConfig {
            nitro: Some(pki.nitro_config()),
            oidc: vec![gh.config(&["sigil"], Preset::GithubActions.claims())],
        })
        .unwrap();
        assert_eq!(r.formats(), ["aws_nitro", "oidc"]);
        let csr = test_csr();
        let doc = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        let input = AttestInput {
            document: &doc,
            csr_der: &csr.0,
            csr_spki_der: &csr.1,
            now_ms: NOW_MS,
            window_secs: 60,
        };
        assert_eq!(
            r.get("aws_nitro").unwrap().attest(&input).unwrap().format(),
            "aws_nitro"
        );
        // The Nitro document is not a JWT.
        assert!(matches!(
            r.get("oidc").unwrap().attest(&input),
            Err(AttestError::Invalid(_))
        ));
        let token =
            gh.mint(&gh.standard_claims("repo:o/r:ref:refs/heads/main", "sigil", NOW_MS, "j"));
        let input = AttestInput {
            document: token.as_bytes(),
            ..input
        };
        assert_eq!(
            r.get("oidc").unwrap().attest(&input).unwrap().format(),
            "oidc"
        );
    }

    #[test]
    fn bad_config_fails_at_startup() {
        let e = Registry::new(&AttestConfig {
            nitro: Some(NitroConfig { roots_der: vec![] }),
            oidc: vec![],
        })
        .unwrap_err();
        assert!(matches!(e, AttestError::Config(_)));
    }
}
