//! The embedded default's signing key: an ES256 (P-256) key generated in `<data_dir>/keys/` on
//! first use, its public half served as a JWKS, and used by `tributary token issue`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is not a PKCS#8 P-256 key")]
    Invalid { path: PathBuf },
    #[error("cannot generate a key: the system random source failed")]
    Random,
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

pub const KEY_FILE: &str = "local-es256.p8";

/// `<data_dir>/keys`
pub fn keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys")
}

pub struct LocalSigningKey {
    pub kid: String,
    der: Vec<u8>,
    x: String,
    y: String,
}

impl std::fmt::Debug for LocalSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl LocalSigningKey {
    /// Loads `<data_dir>/keys/local-es256.p8`, creating it (mode 0600) if absent.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, KeyError> {
        let dir = keys_dir(data_dir);
        let path = dir.join(KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { path, source }
        };
        match std::fs::read(&path) {
            Ok(der) => Self::from_der(der, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                let doc = EcdsaKeyPair::generate_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &SystemRandom::new(),
                )
                .map_err(|_| KeyError::Random)?;
                // A name of this process's own: a shared one let a second process truncate the
                // file the first had already linked into place.
                let tmp = dir.join(format!(
                    "{KEY_FILE}.{}.{:x}.tmp",
                    std::process::id(),
                    tributary_core::now_millis()
                ));
                {
                    let mut opts = std::fs::OpenOptions::new();
                    opts.write(true).create_new(true);
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::OpenOptionsExt;
                        opts.mode(0o600);
                    }
                    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
                    f.write_all(doc.as_ref()).map_err(io(&tmp))?;
                    f.sync_all().map_err(io(&tmp))?;
                }
                // Two processes racing on first start: the first link wins, both read it back.
                if std::fs::hard_link(&tmp, &path).is_err() && !path.exists() {
                    std::fs::rename(&tmp, &path).map_err(io(&path))?;
                }
                let _ = std::fs::remove_file(&tmp);
                let der = std::fs::read(&path).map_err(io(&path))?;
                Self::from_der(der, &path)
            }
            Err(e) => Err(KeyError::Io { path, source: e }),
        }
    }

    fn from_der(der: Vec<u8>, path: &Path) -> Result<Self, KeyError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
                .map_err(|_| KeyError::Invalid { path: path.into() })?;
        let public = pair.public_key().as_ref();
        if public.len() != 65 {
            return Err(KeyError::Invalid { path: path.into() });
        }
        let kid = hex::encode(&Sha256::digest(public)[..8]);
        Ok(Self {
            kid,
            x: URL_SAFE_NO_PAD.encode(&public[1..33]),
            y: URL_SAFE_NO_PAD.encode(&public[33..65]),
            der,
        })
    }

    /// The public key as one JWK.
    pub fn jwk(&self) -> Value {
        json!({"kty": "EC", "crv": "P-256", "x": self.x, "y": self.y, "kid": self.kid, "use": "sig", "alg": "ES256"})
    }

    pub fn decoding_key(&self) -> Result<DecodingKey, KeyError> {
        DecodingKey::from_ec_components(&self.x, &self.y).map_err(|e| KeyError::Sign(e.to_string()))
    }

    /// Signs `claims` as an ES256 JWT with this key's `kid`.
    pub fn sign(&self, claims: &Value) -> Result<String, KeyError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&self.der))
            .map_err(|e| KeyError::Sign(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalSigningKey::load_or_create(dir.path()).unwrap();
        let b = LocalSigningKey::load_or_create(dir.path()).unwrap();
        assert_eq!(a.kid, b.kid);
        assert_eq!(a.jwk(), b.jwk());
        let token = a
            .sign(&json!({"sub": "x", "exp": 4_000_000_000u64}))
            .unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
        v.validate_aud = false;
        let data = jsonwebtoken::decode::<Value>(&token, &b.decoding_key().unwrap(), &v).unwrap();
        assert_eq!(data.claims["sub"], "x");
    }
}
