"""Stand-in for ComfyUI's folder_paths (only what the pack uses), rooted at SONIC_TEST_COMFY_BASE."""

import os

base_path = os.environ.get("SONIC_TEST_COMFY_BASE", os.path.join(os.getcwd(), "comfy_base"))
models_dir = os.path.join(base_path, "models")
supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths: dict = {}


def get_input_directory():
    return os.path.join(base_path, "input")


def get_output_directory():
    return os.path.join(base_path, "output")


def get_temp_directory():
    return os.path.join(base_path, "temp")


def add_model_folder_path(name, path, is_default=False):
    paths, exts = folder_names_and_paths.setdefault(name, ([], set()))
    if path not in paths:
        paths.insert(0, path) if is_default else paths.append(path)


def get_folder_paths(name):
    return folder_names_and_paths[name][0][:]


def get_filename_list(name):
    paths, exts = folder_names_and_paths[name]
    out = set()
    for root in paths:
        for dirpath, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if d != ".git"]
            for f in files:
                if not exts or os.path.splitext(f)[1] in exts:
                    out.add(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def get_full_path(name, filename):
    for root in folder_names_and_paths[name][0]:
        path = os.path.join(root, os.path.normpath(filename))
        if os.path.isfile(path):
            return path
    return None


def get_full_path_or_raise(name, filename):
    path = get_full_path(name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
    return path


def annotated_filepath(name):
    for suffix, folder in ((" [output]", get_output_directory()), (" [input]", get_input_directory()),
                           (" [temp]", get_temp_directory())):
        if name.endswith(suffix):
            return name[: -len(suffix)], folder
    return name, None


def get_annotated_filepath(name, default_dir=None):
    name, folder = annotated_filepath(name)
    return os.path.join(folder or default_dir or get_input_directory(), name)


def exists_annotated_filepath(name):
    return os.path.exists(get_annotated_filepath(name))


def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(full_folder))) != output_dir:
        raise Exception("Saving image outside the output folder is not allowed.")
    counters = [0]
    if os.path.isdir(full_folder):
        for f in os.listdir(full_folder):
            stem, _, rest = f.partition("_")
            if f.startswith(filename + "_") and f[len(filename) + 1 :].split("_")[0].isdigit():
                counters.append(int(f[len(filename) + 1 :].split("_")[0]))
    return full_folder, filename, max(counters) + 1, subfolder, filename_prefix
