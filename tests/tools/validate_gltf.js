// Runs the Khronos glTF validator (npm package gltf-validator) on one .glb or .gltf file and prints
// its report as JSON on stdout: `node validate_gltf.js FILE`. NODE_PATH names the node_modules
// folder that holds gltf-validator (.ci/run installs it into .cache/npm/node_modules).
const fs = require("fs");
const path = require("path");
const validator = require("gltf-validator");

const file = process.argv[2];
const asset = new Uint8Array(fs.readFileSync(file));
validator.validateBytes(asset, {
    uri: path.basename(file),
    maxIssues: 0,                       // report every issue
    writeTimestamp: false,
    externalResourceFunction: (uri) => new Promise((resolve, reject) => {
        fs.readFile(path.resolve(path.dirname(file), decodeURIComponent(uri)),
                    (error, data) => (error ? reject(error.toString()) : resolve(new Uint8Array(data))));
    }),
}).then((report) => {
    process.stdout.write(JSON.stringify({validatorVersion: validator.version(), ...report}, null, 1) + "\n");
}, (error) => {
    process.stderr.write(`validation failed: ${error}\n`);
    process.exit(2);
});
