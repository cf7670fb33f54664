//! Who is calling: the TLS peer's verified X509-SVID (SPIFFE ID and serial)
//! or just its address. The handshake already verified the chain to our CA
//! (client auth is optional on the public port); this only reads the leaf.

use tonic::Request;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::core::Caller;

/// The caller of a request on the public TLS port.
pub fn public_caller<T>(req: &Request<T>) -> Caller {
    let addr = req
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".to_owned());
    let leaf = req
        .peer_certs()
        .and_then(|certs| certs.first().map(|c| c.to_vec()));
    match leaf.as_deref().and_then(svid_identity) {
        Some((spiffe_id, serial)) => Caller::Svid {
            addr,
            spiffe_id,
            serial,
        },
        None => Caller::Peer { addr },
    }
}

/// (SPIFFE ID, lowercase hex serial) of an X509-SVID leaf: exactly one URI SAN.
pub fn svid_identity(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|g| match g {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next()?;
    if uris.next().is_some() || !uri.starts_with("spiffe://") {
        return None;
    }
    Some((uri.to_owned(), hex::encode(cert.raw_serial())))
}
