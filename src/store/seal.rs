//! Encryption at rest for secrets (watermark specs, nonces and secret records).
//!
//! XChaCha20-Poly1305 with a 256-bit key from the configuration, a fresh 192-bit random nonce per
//! value, and the row's identity as associated data, so a sealed value copied into another row
//! does not open there.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Seals and opens secrets with one key.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key hidden>)")
    }
}

/// A sealed value did not open: wrong key, or tampered or moved data.
#[derive(Debug, thiserror::Error)]
#[error("a sealed secret did not open (wrong HALLMARK_SECRET_KEY, or the data was altered)")]
pub struct OpenError;

const VERSION: &str = "v1:";

impl Sealer {
    /// A sealer for a 32-byte key.
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new(key.into()),
        }
    }

    /// Encrypts `plain`, bound to `context` (for example `"watermarks/<id>/secret"`).
    pub fn seal(&self, plain: &[u8], context: &str) -> String {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).expect("the operating system's random source works");
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: context.as_bytes(),
                },
            )
            .expect("encryption of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        format!("{VERSION}{}", STANDARD.encode(out))
    }

    /// Decrypts a value sealed for `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, OpenError> {
        let body = sealed.strip_prefix(VERSION).ok_or(OpenError)?;
        let raw = STANDARD.decode(body).map_err(|_| OpenError)?;
        if raw.len() < 24 + 16 {
            return Err(OpenError);
        }
        let (nonce, ct) = raw.split_at(24);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let s = Sealer::new(&[7; 32]);
        let sealed = s.seal(b"trigger at (24, 24)", "watermarks/a/secret");
        assert!(!sealed.contains("trigger"));
        assert_eq!(
            s.open(&sealed, "watermarks/a/secret").unwrap(),
            b"trigger at (24, 24)"
        );
        assert!(s.open(&sealed, "watermarks/b/secret").is_err());
        assert!(
            Sealer::new(&[8; 32])
                .open(&sealed, "watermarks/a/secret")
                .is_err()
        );
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(
            s.open(
                std::str::from_utf8(&tampered).unwrap(),
                "watermarks/a/secret"
            )
            .is_err()
        );
        // Two seals of the same value differ (fresh nonces).
        assert_ne!(
            sealed,
            s.seal(b"trigger at (24, 24)", "watermarks/a/secret")
        );
    }
}
