//! Host bindings for `plugins/wit` (`expeditor:sink/sink@0.1.0`).

wasmtime::component::bindgen!({
    path: "../../plugins/wit",
    world: "sink",
    // Calls into the plugin are async so that the sink timeout can cut one
    // off while it waits in a host call (a WASI sleep, an HTTP answer):
    // epoch interruption only ever sees guest code. Our own imports (`log`)
    // stay plain functions.
    exports: { default: async },
});

// `event` and `delivery-error` are `use`d by the world, so they are at the
// root already.
pub use expeditor::sink::types::Level;
