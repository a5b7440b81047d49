//! A call's parameters: typed accessors that fail on a wrong type with
//! `org.varlink.service.InvalidParameter`, and a final check that refuses any parameter the
//! method does not know (a typo must not be silently ignored), as the D-Bus options are.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::Failure;

/// Takes parameters out of a call one at a time.
pub(crate) struct Params {
    map: Map<String, Value>,
    fds: Vec<Option<OwnedFd>>,
}

impl Params {
    /// A call's parameters and the descriptors that came with it.
    pub fn new(map: Map<String, Value>, fds: Vec<OwnedFd>) -> Self {
        Params {
            map,
            fds: fds.into_iter().map(Some).collect(),
        }
    }

    /// An optional parameter; `null` is the same as absent.
    pub fn opt<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, Failure> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|_| Failure::invalid_parameter(key)),
        }
    }

    /// A required parameter.
    pub fn req<T: DeserializeOwned>(&mut self, key: &str) -> Result<T, Failure> {
        self.opt(key)?
            .ok_or_else(|| Failure::invalid_parameter(key))
    }

    /// A caller's file: a string (an absolute path the daemon opens once with the caller's
    /// rights) or an integer (the index of a descriptor passed with the call, as sd-varlink
    /// passes them).
    pub fn file(&mut self, key: &str) -> Result<Option<crate::callerfile::CallerInput>, Failure> {
        use crate::callerfile::CallerInput;
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(p)) => Ok(Some(CallerInput::Path(PathBuf::from(p)))),
            Some(Value::Number(n)) => {
                let i = n.as_u64().ok_or_else(|| Failure::invalid_parameter(key))?;
                Ok(Some(CallerInput::Fd(self.take_fd(i, key)?)))
            }
            Some(_) => Err(Failure::invalid_parameter(key)),
        }
    }

    /// A descriptor passed with the call, named by its index.
    pub fn fd(&mut self, key: &str) -> Result<OwnedFd, Failure> {
        let i: u64 = self.req(key)?;
        self.take_fd(i, key)
    }

    /// Descriptor `index` of the call (each is taken once), for parameter `key`.
    fn take_fd(&mut self, index: u64, key: &str) -> Result<OwnedFd, Failure> {
        self.fds
            .get_mut(index as usize)
            .and_then(Option::take)
            .ok_or_else(|| Failure::invalid_parameter(key))
    }

    /// Ready ports: checked as the D-Bus option is.
    pub fn ports(&mut self, key: &str) -> Result<Option<Vec<u16>>, super::Fail> {
        let ports: Option<Vec<u16>> = self.opt(key)?;
        if let Some(p) = &ports {
            crate::model::check_ready_ports(p)?;
        }
        Ok(ports)
    }

    /// Fails on the first parameter not taken.
    pub fn finish(self) -> Result<(), Failure> {
        match self.map.keys().min() {
            Some(k) => Err(Failure::invalid_parameter(k)),
            None => Ok(()),
        }
    }
}
