#!/usr/bin/env python3
"""Writes an OCI image layout of gzip layers, in order:
oci-layout.py LAYER_TAR_GZ UNCOMPRESSED_SHA OUT_DIR TAG [LAYER_TAR_GZ UNCOMPRESSED_SHA]...
OCI_CONFIG (JSON, optional) is the image's run configuration (Entrypoint, Cmd, Env, ...)."""
import hashlib, json, os, shutil, sys

args = sys.argv[1:]
out, tag = args[2], args[3]
pairs = [(args[0], args[1])] + list(zip(args[4::2], args[5::2]))
os.makedirs(f"{out}/blobs/sha256", exist_ok=True)

def blob(data=None, path=None):
    h = hashlib.sha256()
    if path:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        size = os.path.getsize(path)
        shutil.copyfile(path, f"{out}/blobs/sha256/{h.hexdigest()}")
    else:
        h.update(data)
        size = len(data)
        with open(f"{out}/blobs/sha256/{h.hexdigest()}", "wb") as f:
            f.write(data)
    return {"digest": f"sha256:{h.hexdigest()}", "size": size}

layers = [blob(path=p) for p, _ in pairs]
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "config": json.loads(os.environ.get("OCI_CONFIG", "{}")),
                     "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for _, d in pairs]}}).encode()
c = blob(config)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **c},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **l} for l in layers]}).encode()
m = blob(manifest)
index_path = f"{out}/index.json"
index = json.load(open(index_path)) if os.path.exists(index_path) else {"schemaVersion": 2, "manifests": []}
index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
                           "annotations": {"org.opencontainers.image.ref.name": tag}})
with open(index_path, "w") as f:
    json.dump(index, f)
with open(f"{out}/oci-layout", "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
