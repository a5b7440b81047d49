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
    /// The method, without its interface.
    method: String,
    map: Map<String, Value>,
    fds: Vec<Option<OwnedFd>>,
}

impl Params {
    /// A call's parameters and the descriptors that came with it.
    pub fn new(method: &str, map: Map<String, Value>, fds: Vec<OwnedFd>) -> Self {
        Params {
            method: method.to_owned(),
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

    /// Fails on the first parameter not taken.
    pub fn finish(self) -> Result<(), Failure> {
        match self.map.keys().min() {
            Some(k) => Err(Failure::invalid_parameter(k)),
            None => Ok(()),
        }
    }
}

/// A key as the D-Bus options spell it (`memory_mib`) as Varlink spells it (`memoryMib`).
fn camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                out.push(c.to_ascii_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

/// A shared folder as Varlink carries it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ShareParam {
    host: String,
    guest: String,
    #[serde(default)]
    read_only: bool,
}

/// The Varlink side of a request: keys lowerCamelCased, values by serde.
impl crate::ops::request::Source for Params {
    type Error = super::Fail;
    fn method(&self) -> &str {
        &self.method
    }
    fn string(&mut self, key: &str) -> Result<Option<String>, super::Fail> {
        Ok(self.opt(&camel(key))?)
    }
    fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>, super::Fail> {
        Ok(self.opt(&camel(key))?)
    }
    fn bool(&mut self, key: &str) -> Result<Option<bool>, super::Fail> {
        Ok(self.opt(&camel(key))?)
    }
    fn u16(&mut self, key: &str) -> Result<Option<u16>, super::Fail> {
        Ok(self.opt(&camel(key))?)
    }
    fn u32(&mut self, key: &str) -> Result<Option<u32>, super::Fail> {
        Ok(self.opt(&camel(key))?)
    }
    fn u64(&mut self, key: &str) -> Result<Option<u64>, super::Fail> {
        Ok(self.opt(&camel(key))?)
    }
    fn ports(&mut self, key: &str) -> Result<Option<Vec<u16>>, super::Fail> {
        Ok(self.opt(&camel(key))?)
    }
    fn labels(
        &mut self,
        key: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, super::Fail> {
        Ok(self.opt(&camel(key))?)
    }
    fn shares(&mut self, key: &str) -> Result<Option<Vec<crate::model::Share>>, super::Fail> {
        let list: Option<Vec<ShareParam>> = self.opt(&camel(key))?;
        Ok(list.map(|l| {
            l.into_iter()
                .map(|s| crate::model::Share {
                    host: s.host,
                    guest: s.guest,
                    read_only: s.read_only,
                })
                .collect()
        }))
    }
    fn file(&mut self, key: &str) -> Result<Option<crate::callerfile::CallerInput>, super::Fail> {
        Ok(Params::file(self, &camel(key))?)
    }
    fn finish(self) -> Result<(), super::Fail> {
        Ok(Params::finish(self)?)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use zbus::{OwnedVariant, Variant};

    use super::*;
    use crate::ops::request::{read, DeleteVmOptions, NoOptions};
    use crate::vms::CreateOptions;

    fn dbus(entries: Vec<(&str, Variant<'static>)>) -> crate::dbus::OptionMap {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), OwnedVariant::try_from(v).unwrap()))
            .collect()
    }

    fn varlink(method: &str, v: Value) -> Params {
        Params::new(method, v.as_object().unwrap().clone(), Vec::new())
    }

    /// The parameter a Varlink refusal names, or the service error's message.
    fn refusal<T>(r: Result<T, super::super::Fail>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(super::super::Fail::Varlink(f)) => f.parameters["parameter"].to_string(),
            Err(super::super::Fail::Service(e)) => e.to_string(),
        }
    }

    #[test]
    fn both_front_ends_read_one_request_with_the_same_defaults_and_refusals() {
        let shares = vec![("/srv/a".to_owned(), "/a".to_owned(), true)];
        let from_bus: CreateOptions = crate::dbus::request(
            "CreateVM",
            dbus(vec![
                ("image", Variant::from("debian")),
                ("vcpus", Variant::from(3u32)),
                ("memory_mib", Variant::from(768u32)),
                ("disk_size", Variant::from(2u64 << 30)),
                ("network", Variant::from("shared")),
                ("publish", Variant::from(vec!["8080:80".to_owned()])),
                ("shares", Variant::from(shares)),
            ]),
        )
        .unwrap();
        let from_varlink: CreateOptions = read(varlink(
            "Create",
            json!({
                "image": "debian", "vcpus": 3, "memoryMib": 768, "diskSize": 2u64 << 30,
                "network": "shared", "publish": ["8080:80"],
                "shares": [{"host": "/srv/a", "guest": "/a", "readOnly": true}],
            }),
        ))
        .unwrap();
        assert_eq!(from_bus, from_varlink);
        assert_eq!(from_bus.memory_mib, 768);
        assert_eq!(from_bus.shares[0].guest, "/a");
        // Nothing given: both get the operation's defaults.
        let bus_default: CreateOptions = crate::dbus::request("CreateVM", dbus(vec![])).unwrap();
        let varlink_default: CreateOptions = read(varlink("Create", json!({}))).unwrap();
        assert_eq!(bus_default, varlink_default);
        assert_eq!(bus_default.vcpus, CreateOptions::default().vcpus);

        // A key the request does not know, a key spelled the other front end's way, and a
        // value of the wrong type are refused by both.
        let e = crate::dbus::request::<DeleteVmOptions>(
            "DeleteVM",
            dbus(vec![("froce", Variant::from(true))]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown option(s) froce"), "{e}");
        assert_eq!(
            refusal(read::<DeleteVmOptions, _>(varlink(
                "Delete",
                json!({"froce": true})
            ))),
            "\"froce\""
        );
        let e = crate::dbus::request::<CreateOptions>(
            "CreateVM",
            dbus(vec![("memoryMib", Variant::from(1u32))]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown option(s) memoryMib"), "{e}");
        assert_eq!(
            refusal(read::<CreateOptions, _>(varlink(
                "Create",
                json!({"memory_mib": 1})
            ))),
            "\"memory_mib\""
        );
        let e = crate::dbus::request::<CreateOptions>(
            "CreateVM",
            dbus(vec![("vcpus", Variant::from("two"))]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("'vcpus' must have type 'u'"), "{e}");
        assert_eq!(
            refusal(read::<CreateOptions, _>(varlink(
                "Create",
                json!({"vcpus": "two"})
            ))),
            "\"vcpus\""
        );
        // The service's own checks run for both: a bad network mode, a bad ready port.
        let e = crate::dbus::request::<CreateOptions>(
            "CreateVM",
            dbus(vec![("network", Variant::from("everywhere"))]),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("CreateVM:"), "{e}");
        let v = refusal(read::<CreateOptions, _>(varlink(
            "Create",
            json!({"network": "everywhere"}),
        )));
        assert!(v.starts_with("Create:"), "{v}");
        let bad_port = crate::dbus::request::<crate::images::PullOptions>(
            "PullImage",
            dbus(vec![("ready_ports", Variant::from(vec![0u16]))]),
        );
        assert!(bad_port.is_err());
        assert!(
            read::<crate::images::PullOptions, _>(varlink("Pull", json!({"readyPorts": [0]})))
                .is_err()
        );
        // A method without options refuses any.
        assert!(crate::dbus::request::<NoOptions>(
            "PruneCache",
            dbus(vec![("all", Variant::from(true))])
        )
        .is_err());
        assert!(read::<NoOptions, _>(varlink("PruneCache", json!({"all": true}))).is_err());
    }

    #[test]
    fn keys_are_camel_cased_for_varlink() {
        assert_eq!(camel("memory_mib"), "memoryMib");
        assert_eq!(camel("timeout_sec"), "timeoutSec");
        assert_eq!(camel("kernel_path"), "kernelPath");
        assert_eq!(camel("image"), "image");
    }
}
