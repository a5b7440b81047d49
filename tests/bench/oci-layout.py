#!/usr/bin/env python3
"""Writes a one-layer OCI image layout: oci-layout.py TREE_TAR_GZ UNCOMPRESSED_SHA OUT_DIR TAG."""
import hashlib, json, os, shutil, sys

layer, diff_id, out, tag = sys.argv[1:5]
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

l = blob(path=layer)
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]}}).encode()
c = blob(config)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **c},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **l}]}).encode()
m = blob(manifest)
with open(f"{out}/index.json", "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
               **m, "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
with open(f"{out}/oci-layout", "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
