//! `a{sv}` options: typed accessors that fail on a wrong type, and a final check that fails
//! on any key the method does not know (a typo must not be silently ignored).

use std::collections::HashMap;
use std::path::PathBuf;

use zbus::OwnedVariant;

use crate::{Error, Result};

/// The options map as methods receive it.
pub type OptionMap = HashMap<String, OwnedVariant>;

/// Takes options out of a map one key at a time.
pub struct Options {
    method: &'static str,
    map: OptionMap,
}

impl Options {
    /// Wraps a method's options.
    pub fn new(method: &'static str, map: OptionMap) -> Self {
        Options { method, map }
    }

    fn take<T>(&mut self, key: &str, sig: &str) -> Result<Option<T>>
    where
        T: TryFrom<OwnedVariant>,
    {
        let Some(v) = self.map.remove(key) else {
            return Ok(None);
        };
        let actual = v.value_signature().to_string();
        T::try_from(v).map(Some).map_err(|_| {
            Error::InvalidArgument(format!(
                "{}: option '{key}' must have type '{sig}', not '{actual}'",
                self.method
            ))
        })
    }

    /// A string option.
    pub fn string(&mut self, key: &str) -> Result<Option<String>> {
        self.take::<String>(key, "s")
    }

    /// A path option (a string that must be absolute, checked by the service).
    pub fn path(&mut self, key: &str) -> Result<Option<PathBuf>> {
        Ok(self.string(key)?.map(PathBuf::from))
    }

    /// A caller's file: `h` (a descriptor the client opened, preferred) or `s` (an absolute
    /// path the daemon opens once with the caller's rights).
    pub fn file(&mut self, key: &str) -> Result<Option<crate::callerfile::CallerInput>> {
        use crate::callerfile::CallerInput;
        let Some(v) = self.map.remove(key) else {
            return Ok(None);
        };
        let sig = v.value_signature().to_string();
        match sig.as_str() {
            "h" => {
                let bad = |e: zbus::Error| {
                    Error::InvalidArgument(format!("{}: option '{key}': {e}", self.method))
                };
                let fd = zbus::Fd::try_from(v).map_err(bad)?;
                let fd = std::os::fd::OwnedFd::try_from(fd).map_err(bad)?;
                Ok(Some(CallerInput::Fd(fd)))
            }
            "s" => {
                let p = String::try_from(v).map_err(|e| {
                    Error::InvalidArgument(format!("{}: option '{key}': {e}", self.method))
                })?;
                Ok(Some(CallerInput::Path(PathBuf::from(p))))
            }
            _ => Err(Error::InvalidArgument(format!(
                "{}: option '{key}' must have type 'h' (a file descriptor you opened) or 's' (an absolute path), not '{sig}'",
                self.method
            ))),
        }
    }

    /// A `b` option.
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.take::<bool>(key, "b")
    }

    /// A `q` option.
    pub fn u16(&mut self, key: &str) -> Result<Option<u16>> {
        self.take::<u16>(key, "q")
    }

    /// A `u` option.
    pub fn u32(&mut self, key: &str) -> Result<Option<u32>> {
        self.take::<u32>(key, "u")
    }

    /// A `t` option.
    pub fn u64(&mut self, key: &str) -> Result<Option<u64>> {
        self.take::<u64>(key, "t")
    }

    /// An `as` option.
    pub fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        self.take::<Vec<String>>(key, "as")
    }

    /// A `shares` option: `a(ssb)` (host folder, guest folder, read-only).
    pub fn shares(&mut self, key: &str) -> Result<Option<Vec<crate::model::Share>>> {
        Ok(self
            .take::<Vec<(String, String, bool)>>(key, "a(ssb)")?
            .map(|list| {
                list.into_iter()
                    .map(|(host, guest, read_only)| crate::model::Share {
                        host,
                        guest,
                        read_only,
                    })
                    .collect()
            }))
    }

    /// Fails if any key was not taken.
    pub fn finish(self) -> Result<()> {
        let mut left: Vec<_> = self.map.into_keys().collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        Err(Error::InvalidArgument(format!(
            "{}: unknown option(s) {}; see `busctl introspect org.banger /org/banger` for the options each method takes",
            self.method,
            left.join(", ")
        )))
    }
}

/// The D-Bus side of a request: keys as they are, types by their D-Bus signatures.
impl crate::ops::request::Source for Options {
    type Error = Error;
    fn method(&self) -> &str {
        self.method
    }
    fn string(&mut self, key: &str) -> Result<Option<String>> {
        Options::string(self, key)
    }
    fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        Options::strings(self, key)
    }
    fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        Options::bool(self, key)
    }
    fn u16(&mut self, key: &str) -> Result<Option<u16>> {
        Options::u16(self, key)
    }
    fn u32(&mut self, key: &str) -> Result<Option<u32>> {
        Options::u32(self, key)
    }
    fn u64(&mut self, key: &str) -> Result<Option<u64>> {
        Options::u64(self, key)
    }
    fn ports(&mut self, key: &str) -> Result<Option<Vec<u16>>> {
        self.take::<Vec<u16>>(key, "aq")
    }
    fn shares(&mut self, key: &str) -> Result<Option<Vec<crate::model::Share>>> {
        Options::shares(self, key)
    }
    fn labels(&mut self, key: &str) -> Result<Option<std::collections::BTreeMap<String, String>>> {
        Ok(self
            .take::<std::collections::HashMap<String, String>>(key, "a{ss}")?
            .map(|m| m.into_iter().collect()))
    }
    fn file(&mut self, key: &str) -> Result<Option<crate::callerfile::CallerInput>> {
        Options::file(self, key)
    }
    fn finish(self) -> Result<()> {
        Options::finish(self)
    }
}

/// Reads `method`'s request `R` from its `a{sv}` options.
pub fn request<R: crate::ops::request::Request>(method: &'static str, map: OptionMap) -> Result<R> {
    crate::ops::request::read(Options::new(method, map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::Variant;

    fn map(entries: Vec<(&str, Variant<'static>)>) -> OptionMap {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), OwnedVariant::try_from(v).unwrap()))
            .collect()
    }

    #[test]
    fn typed_values_come_out_and_unknown_keys_fail() {
        let mut o = Options::new(
            "PullImage",
            map(vec![
                ("name", Variant::from("x")),
                ("size", Variant::from(5u64)),
            ]),
        );
        assert_eq!(o.string("name").unwrap().as_deref(), Some("x"));
        assert_eq!(o.u64("size").unwrap(), Some(5));
        assert_eq!(o.bool("insecure").unwrap(), None);
        o.finish().unwrap();

        let mut o = Options::new("PullImage", map(vec![("nmae", Variant::from("x"))]));
        assert_eq!(o.string("name").unwrap(), None);
        let err = o.finish().unwrap_err();
        assert!(err.to_string().contains("unknown option(s) nmae"), "{err}");
    }

    #[test]
    fn wrong_types_are_named() {
        let mut o = Options::new("CreateVM", map(vec![("vcpus", Variant::from("two"))]));
        let err = o.u32("vcpus").unwrap_err();
        assert!(
            err.to_string()
                .contains("'vcpus' must have type 'u', not 's'"),
            "{err}"
        );
    }
}
