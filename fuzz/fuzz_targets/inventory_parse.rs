//! Arbitrary text as an inventory file, then selectors against it: parse (every problem with a
//! position inside the file), `runbook inventory show`-style selection with selectors cut from
//! the same input, the Ansible exports, and `add_host` with arbitrary names and specs.
//!
//! Properties besides "no panic, no hang": a rejected inventory has at least one error, each
//! with a position that starts inside the file; selections never return a host twice and
//! always return hosts in inventory order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runbook_engine::inventory::{AnsibleFormat, Inventory, NewHost, Selector};
use runbook_engine::Source;

fuzz_target!(|input: &str| {
    // The inventory is the text before the first NUL; what follows are selectors.
    let (text, rest) = input.split_once('\0').unwrap_or((input, "all"));
    let source = Source::new("fuzz-inventory.toml", text);
    let mut inv = match Inventory::parse(&source) {
        Ok(inv) => inv,
        Err(diags) => {
            assert!(diags.has_errors(), "rejected without an error: {diags:?}");
            for d in diags.iter() {
                let label = d
                    .primary
                    .as_ref()
                    .unwrap_or_else(|| panic!("diagnostic without a position: {d}"));
                assert!(label.span.start <= text.len() + 1, "span outside the file: {d}");
            }
            return;
        }
    };
    let _ = inv.to_ansible(AnsibleFormat::Ini);
    let _ = inv.to_ansible(AnsibleFormat::Yaml);
    for sel in rest.split('\0') {
        let Ok(selector) = Selector::parse(sel) else {
            continue;
        };
        if let Ok(hosts) = inv.select(&selector) {
            let positions: Vec<usize> = hosts
                .iter()
                .map(|h| {
                    inv.hosts()
                        .iter()
                        .position(|x| x.name == h.name)
                        .expect("selected host is in the inventory")
                })
                .collect();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "not in inventory order or repeated: {positions:?}"
            );
        }
        // The selector text doubles as a host name and a spec.
        let _ = inv.add_host(&NewHost {
            name: sel.to_owned(),
            spec: serde_json::json!({ "address": sel, "groups": [sel] }),
        });
    }
});
