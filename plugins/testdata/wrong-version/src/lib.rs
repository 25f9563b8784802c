//! A plugin built against `expeditor:sink@0.2.0`, a version this expeditor
//! does not ship: `expeditor check` must refuse it with a clear message.
//! Otherwise a well-behaved plugin (the WIT is the same but for the version).

wit_bindgen::generate!({
    path: "wit",
    world: "sink",
});

use expeditor::sink::host::log;
use expeditor::sink::types::Level;

struct Plugin;

impl Guest for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn deliver(events: Vec<Event>) -> Vec<Result<(), DeliveryError>> {
        log(Level::Info, "delivered by a plugin from the future");
        events.iter().map(|_| Ok(())).collect()
    }

    fn shutdown() {}
}

export!(Plugin);
