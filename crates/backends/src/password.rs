//! Password generation.

use rand::Rng;
use secrecy::SecretString;

use crate::BackendError;

/// Shortest password [`generate`] accepts to produce.
pub const MIN_LENGTH: usize = 16;
/// Longest password [`generate`] accepts to produce.
pub const MAX_LENGTH: usize = 1024;
/// Fewest distinct characters an alphabet may have.
pub const MIN_ALPHABET: usize = 10;

const ALPHANUMERIC: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// How passwords are generated. The default (32 alphanumeric characters, about 190
/// bits) is safe in connection strings, URLs and shell variables without escaping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordPolicy {
    pub length: usize,
    /// Characters to draw from; duplicates are ignored.
    pub alphabet: String,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            length: 32,
            alphabet: ALPHANUMERIC.to_owned(),
        }
    }
}

impl PasswordPolicy {
    /// The distinct characters of the alphabet, in first-seen order, after checking
    /// the policy.
    fn checked_alphabet(&self) -> Result<Vec<char>, BackendError> {
        if !(MIN_LENGTH..=MAX_LENGTH).contains(&self.length) {
            return Err(BackendError::Invalid(format!(
                "password length {} is outside {MIN_LENGTH}..={MAX_LENGTH}",
                self.length
            )));
        }
        let mut distinct: Vec<char> = Vec::new();
        for c in self.alphabet.chars() {
            if c.is_control() || c.is_whitespace() {
                return Err(BackendError::Invalid(
                    "password alphabet contains whitespace or a control character".into(),
                ));
            }
            if !distinct.contains(&c) {
                distinct.push(c);
            }
        }
        if distinct.len() < MIN_ALPHABET {
            return Err(BackendError::Invalid(format!(
                "password alphabet has {} distinct characters, at least {MIN_ALPHABET} are needed",
                distinct.len()
            )));
        }
        Ok(distinct)
    }

    /// Check the policy without generating anything.
    pub fn validate(&self) -> Result<(), BackendError> {
        self.checked_alphabet().map(|_| ())
    }
}

/// A new random password following `policy`, drawn uniformly from its alphabet with
/// the thread-local CSPRNG (ChaCha, seeded and periodically reseeded from the OS).
pub fn generate(policy: &PasswordPolicy) -> Result<SecretString, BackendError> {
    let alphabet = policy.checked_alphabet()?;
    let mut rng = rand::rng();
    let password: String = (0..policy.length)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
        .collect();
    Ok(SecretString::from(password))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn default_policy_gives_32_alphanumerics() {
        let pw = generate(&PasswordPolicy::default()).expect("valid policy");
        assert_eq!(pw.expose_secret().len(), 32);
        assert!(
            pw.expose_secret()
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
    }

    #[test]
    fn passwords_differ() {
        let policy = PasswordPolicy::default();
        let a = generate(&policy).expect("valid");
        let b = generate(&policy).expect("valid");
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn custom_alphabet_is_respected() {
        let policy = PasswordPolicy {
            length: 64,
            alphabet: "0123456789".into(),
        };
        let pw = generate(&policy).expect("valid");
        assert_eq!(pw.expose_secret().len(), 64);
        assert!(pw.expose_secret().chars().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn weak_policies_are_rejected() {
        let short = PasswordPolicy {
            length: 15,
            ..PasswordPolicy::default()
        };
        assert!(matches!(generate(&short), Err(BackendError::Invalid(_))));
        let small = PasswordPolicy {
            length: 32,
            alphabet: "aaaaaaaaaabcdefgh".into(), // 8 distinct
        };
        assert!(matches!(generate(&small), Err(BackendError::Invalid(_))));
        let spaces = PasswordPolicy {
            length: 32,
            alphabet: "abcdefghij k".into(),
        };
        assert!(spaces.validate().is_err());
    }

    #[test]
    fn every_character_shows_up() {
        // 10 symbols, 2000 draws: each missing has probability ~1e-91.
        let policy = PasswordPolicy {
            length: 1000,
            alphabet: "!#$%&*+-=?".into(),
        };
        let a = generate(&policy).expect("valid");
        let b = generate(&policy).expect("valid");
        for c in policy.alphabet.chars() {
            assert!(a.expose_secret().contains(c) || b.expose_secret().contains(c));
        }
    }
}
