"""Size limits enforced on both sides before any work is done (bytes and pixels)."""

MIB = 1024 * 1024

MAX_HEADER_BYTES = 64 * 1024          # the JSON header frame
MAX_PHOTO_BYTES = 40 * MIB            # an encoded photo in a request
MAX_PHOTO_PIXELS = 64_000_000         # width * height of a decoded photo
MIN_PHOTO_SIDE = 64                   # pixels; smaller photos are rejected
MAX_RESULT_FILE_BYTES = 256 * MIB     # one result file (a texture, a mesh)
MAX_FRAMES = 65                       # header + at most 64 payload frames
MAX_MESSAGE_BYTES = 1024 * MIB        # ZMQ_MAXMSGSIZE, a hard cap per frame on the socket
MAX_NAME_CHARS = 255                  # file names carried in messages
MIN_TEXTURE_SIZE = 256                # pixels per side
MAX_TEXTURE_SIZE = 8192
DEFAULT_TEXTURE_SIZE = 2048
MAX_PERSON_PHOTOS = 8                 # photos of one person in one reconstruct request (1.2)
MAX_PERSON_BYTES = 160 * MIB          # their encoded bytes together
