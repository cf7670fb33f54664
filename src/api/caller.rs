//! Who is calling: the TLS peer's verified X509-SVID (SPIFFE ID and serial)
//! or just its address. The handshake already verified the chain to our CA
//! (client auth is optional on the public port); this only reads the leaf.

use tonic::Request;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::{core::Caller, ratelimit::Cidr};

/// The caller of a request on the public TLS port (no trusted proxies).
pub fn public_caller<T>(req: &Request<T>) -> Caller {
    public_caller_via(req, &[])
}

/// The caller of a request on the public TLS port. When the connection comes
/// from a trusted proxy, the client address is the last `x-forwarded-for`
/// hop instead (only an IP address is accepted; anything else is ignored).
pub fn public_caller_via<T>(req: &Request<T>, trusted_proxies: &[Cidr]) -> Caller {
    let remote = req.remote_addr();
    let forwarded = remote
        .filter(|r| trusted_proxies.iter().any(|c| c.contains(r.ip())))
        .and_then(|_| req.metadata().get("x-forwarded-for"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok());
    let addr = match (forwarded, remote) {
        (Some(ip), _) => ip.to_string(),
        (None, Some(a)) => a.to_string(),
        (None, None) => "unknown".to_owned(),
    };
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
