//! Tables for people, JSON for programs.

use serde_json::Value;

/// How to print.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// JSON instead of tables.
    pub json: bool,
}

impl Output {
    /// Prints rows: a table with `headers`, or a JSON array of objects keyed by `keys`.
    pub fn table(&self, headers: &[&str], keys: &[&str], rows: Vec<Vec<Value>>) {
        if self.json {
            let objs: Vec<Value> = rows
                .into_iter()
                .map(|r| Value::Object(keys.iter().map(|k| json_key(k)).zip(r).collect()))
                .collect();
            println!("{}", Value::Array(objs));
            return;
        }
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|v| v.as_str().map(str::to_owned).unwrap_or(v.to_string()))
                    .collect()
            })
            .collect();
        let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
        for r in &cells {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cols: Vec<&str>| {
            let s: Vec<String> = cols
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            println!("{}", s.join("  ").trim_end());
        };
        line(headers.to_vec());
        for r in &cells {
            line(r.iter().map(String::as_str).collect());
        }
    }

    /// What a verb that prints nothing for people says to programs: a JSON object of
    /// `fields` (nothing without `--json`).
    pub fn done(&self, fields: Vec<(&str, Value)>) {
        if self.json {
            self.object(fields);
        }
    }

    /// A line for people on stdout (nothing with `--json`, whose programs get the result).
    pub fn say(&self, line: &str) {
        if !self.json {
            println!("{line}");
        }
    }

    /// Prints one object: `key: value` lines, or a JSON object.
    pub fn object(&self, fields: Vec<(&str, Value)>) {
        if self.json {
            let obj: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (json_key(k), v)).collect();
            println!("{}", Value::Object(obj));
            return;
        }
        for (k, v) in fields {
            println!(
                "{k}: {}",
                v.as_str().map(str::to_owned).unwrap_or(v.to_string())
            );
        }
    }
}

/// A key as every `--json` of the CLI writes it: lowerCamelCase, as the Varlink API names its
/// fields (`memoryMib`, `sshHostKey`, `jobId`), whether the value came from a D-Bus property
/// (`MemoryMiB`), a D-Bus list's columns or a Varlink reply. One style, so a program reads
/// the same key over either transport (gh and kubectl write camelCase too).
pub fn json_key(key: &str) -> String {
    // D-Bus properties whose acronyms Varlink spells as words.
    let fixed = match key {
        "VCpus" => Some("vcpus"),
        "VSockCID" => Some("vsockCid"),
        "MemoryMiB" => Some("memoryMib"),
        "SSHAddress" => Some("sshAddress"),
        "SSHHostKey" => Some("sshHostKey"),
        _ => None,
    };
    if let Some(k) = fixed {
        return k.to_owned();
    }
    let mut out = String::with_capacity(key.len());
    for (i, part) in key.split('_').filter(|p| !p.is_empty()).enumerate() {
        let mut chars = part.chars();
        let first = chars.next().unwrap_or_default();
        if i == 0 {
            out.extend(first.to_lowercase());
        } else {
            out.extend(first.to_uppercase());
        }
        out.extend(chars);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::json_key;

    #[test]
    fn every_key_style_becomes_varlinks() {
        for (given, want) in [
            ("MemoryMiB", "memoryMib"),
            ("memoryMib", "memoryMib"),
            ("memory_mib", "memoryMib"),
            ("SSHHostKey", "sshHostKey"),
            ("VSockCID", "vsockCid"),
            ("VCpus", "vcpus"),
            ("CreatedAt", "createdAt"),
            ("job_id", "jobId"),
            ("your_memory_mib", "yourMemoryMib"),
            ("Id", "id"),
            ("name", "name"),
        ] {
            assert_eq!(json_key(given), want, "{given}");
        }
    }
}
